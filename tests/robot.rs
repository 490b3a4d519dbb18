//! Robot messages over real HTTP against the fake DingTalk: the signed endpoint
//! `POST /dingtalk/robot/<app>` (stored once however often and whichever way a message comes,
//! Stream included; every bad request a 4xx JSON error with nothing stored; the encrypted
//! variant), a program's `on_robot_message` handler, and the `robot_reply` action through the
//! session webhook while it is valid, then through the group-message API. The signature is
//! computed here with the `hmac` crate, independently of dinghook's own function.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use dinghook::config::Config;
use dinghook::event::{ConversationType, RobotMessage};
use dinghook::handler::{HandlerError, Registrations, RegistryBuilder};
use dinghook::secret::Secret;
use dinghook::time::now_millis;
use fake_dingtalk::FakeDingTalk;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use support::stores::Backend;
use support::TestApp;

const APP_KEY: &str = "dingrobotapp";
const APP_SECRET: &str = "robot-secret-do-not-log";
const API_TOKEN: &str = "robot-test-api-token-0123456789";
const BODY_LIMIT: usize = 16 * 1024;

/// DingTalk's `sign`: base64(HMAC-SHA256(key = AppSecret, timestamp + "\n" + AppSecret)).
fn sign(timestamp: &str, secret: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}\n{secret}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

async fn fake() -> (FakeDingTalk, String) {
    let (fake, url) = FakeDingTalk::spawn().await.expect("fake starts");
    fake.set_credentials(APP_KEY, APP_SECRET);
    (fake, url)
}

/// The default app against the fake: its AppSecret signs robot messages; Stream mode with
/// robot messages; the HTTP API on; `store_url` for PostgreSQL.
fn configure(config: &mut Config, url: &str, store_url: Option<String>) {
    config.dingtalk.app_key = APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(APP_SECRET);
    config.dingtalk.api_url = url.into();
    config.dingtalk.oapi_url = url.into();
    config.dingtalk.retry_base_delay = Duration::from_millis(5);
    config.dingtalk.retry_max_delay = Duration::from_millis(20);
    config.recovery.enabled = false;
    config.stream.enabled = true;
    config.stream.robot = true;
    config.stream.backoff_base = Duration::from_millis(50);
    config.stream.backoff_max = Duration::from_millis(400);
    config.callback.body_limit = BODY_LIMIT;
    config.api.listen = "127.0.0.1:0".into();
    config.api.token = Secret::new(API_TOKEN);
    if let Some(store_url) = store_url {
        config.store.url = store_url;
    }
}

async fn app_with(url: &str, backend: Backend, handlers: RegistryBuilder) -> Option<TestApp> {
    let store_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => match support::stores::fresh_postgres_database().await {
            Some(pg) => Some(pg),
            None => {
                eprintln!("SKIPPED: DINGHOOK_TEST_PG_URL is not set");
                return None;
            }
        },
    };
    let url = url.to_owned();
    Some(
        TestApp::spawn_with_handlers_from(move |config| {
            configure(config, &url, store_url);
            handlers
        })
        .await,
    )
}

async fn app(url: &str) -> TestApp {
    app_with(url, Backend::Sqlite, RegistryBuilder::new())
        .await
        .expect("SQLite is always there")
}

fn robot_url(app: &TestApp, name: &str) -> String {
    app.url(&format!("/dingtalk/robot/{name}"))
}

/// POSTs `body` to the default app's robot endpoint signed for `timestamp` with `secret`.
async fn post_signed(
    app: &TestApp,
    timestamp: &str,
    secret: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.client
        .post(robot_url(app, "default"))
        .header("content-type", "application/json; charset=utf-8")
        .header("timestamp", timestamp)
        .header("sign", sign(timestamp, secret))
        .body(body)
        .send()
        .await
        .expect("robot endpoint answers")
}

async fn post_message(app: &TestApp, message: &Value) -> reqwest::Response {
    let now = now_millis().to_string();
    post_signed(app, &now, APP_SECRET, message.to_string()).await
}

async fn assert_stored_reply(response: reqwest::Response) {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON answer");
    assert_eq!(body, json!({}));
}

/// A 4xx with `{"error": {"code", "message"}}` naming `code`, and no secret in it.
async fn assert_refused(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status, "expected {code}");
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(body["error"]["code"], code, "{text}");
    assert!(body["error"]["message"].as_str().is_some(), "{text}");
    assert!(!text.contains(APP_SECRET), "{text}");
}

fn message(msg_id: &str) -> Value {
    json!({
        "msgId": msg_id,
        "msgtype": "text",
        "text": {"content": " ack INC-42"},
        "conversationId": "cidwarroom==",
        "conversationType": "2",
        "conversationTitle": "war room",
        "senderId": "$:LWCP_v1:$sender",
        "senderNick": "Ann",
        "senderStaffId": "staff-ann",
        "senderCorpId": "dingcorp",
        "chatbotUserId": "$:LWCP_v1:$bot",
        "robotCode": "dingrobotcode",
        "isInAtList": true,
        "atUsers": [{"dingtalkId": "$:LWCP_v1:$bot"}, {"dingtalkId": "$:x", "staffId": "staff-bob"}],
        "createAt": now_millis(),
    })
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn stored_once_whichever_way(backend: Backend) {
    let (fake, url) = fake().await;
    let Some(app) = app_with(&url, backend, RegistryBuilder::new()).await else {
        return;
    };
    let first = message("msg-http-1");
    assert_stored_reply(post_message(&app, &first).await).await;
    // Delivered again over HTTP, then by Stream: the same row.
    assert_stored_reply(post_message(&app, &first).await).await;
    fake.stream_push_robot(vec![first.clone()]).unwrap();
    wait_for("the Stream copy answered", Duration::from_secs(10), || {
        fake.stream_report()
            .acks
            .get("CALLBACK")
            .copied()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let row = app
        .store
        .find_by_dedup_key("robot:msg-http-1")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(row.event_type, "robot_message");
    assert_eq!(row.source, "push", "stored once, by the first to come");
    assert_eq!(row.corp_id.as_deref(), Some("dingcorp"));
    let payload: Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload["text"]["content"], " ack INC-42");
    // One by Stream first, then over HTTP: still one row.
    fake.stream_push_robot(vec![message("msg-stream-1")])
        .unwrap();
    let stored = loop {
        if let Some(row) = app
            .store
            .find_by_dedup_key("robot:msg-stream-1")
            .await
            .unwrap()
        {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stored.source, "stream");
    assert_stored_reply(post_message(&app, &message("msg-stream-1")).await).await;
    assert_eq!(app.store.count().await.unwrap(), 2);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("type=\"robot_message\",outcome=\"stored\"}")
            && metrics.contains("type=\"robot_message\",outcome=\"duplicate\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains(APP_SECRET));
    app.stop().await;
}

#[tokio::test]
async fn a_signed_message_is_stored_once_however_often_and_whichever_way_it_comes() {
    stored_once_whichever_way(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_signed_message_is_stored_once_however_often_and_whichever_way_it_comes() {
    stored_once_whichever_way(Backend::Postgres).await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_json_and_store_nothing() {
    let (_fake, url) = fake().await;
    let app = app(&url).await;
    let body = message("msg-bad").to_string();
    let now = now_millis().to_string();
    // Signed with another secret.
    assert_refused(
        post_signed(&app, &now, "not-the-secret", body.clone()).await,
        401,
        "sign_mismatch",
    )
    .await;
    // A sign that is not even base64, and one for another timestamp.
    let forged = app
        .client
        .post(robot_url(&app, "default"))
        .header("timestamp", &now)
        .header("sign", "not base64 at all")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_refused(forged, 401, "sign_mismatch").await;
    let other_time = (now_millis() - 1000).to_string();
    let replayed_sign = app
        .client
        .post(robot_url(&app, "default"))
        .header("timestamp", &now)
        .header("sign", sign(&other_time, APP_SECRET))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_refused(replayed_sign, 401, "sign_mismatch").await;
    // Older than an hour (and from the future), correctly signed.
    for skew in [-3_700_000_i64, 3_700_000] {
        let stale = (now_millis() + skew).to_string();
        assert_refused(
            post_signed(&app, &stale, APP_SECRET, body.clone()).await,
            400,
            "timestamp_out_of_window",
        )
        .await;
    }
    // Missing headers.
    let no_sign = app
        .client
        .post(robot_url(&app, "default"))
        .header("timestamp", &now)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_refused(no_sign, 400, "missing_header").await;
    let no_timestamp = app
        .client
        .post(robot_url(&app, "default"))
        .header("sign", sign(&now, APP_SECRET))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_refused(no_timestamp, 400, "missing_header").await;
    let not_a_number = post_signed(&app, "soon", APP_SECRET, body.clone()).await;
    assert_refused(not_a_number, 400, "invalid_timestamp").await;
    // Bodies that are not a message.
    for bad in ["not json", "[1,2]", "\"text\"", ""] {
        assert_refused(
            post_signed(&app, &now, APP_SECRET, bad.to_owned()).await,
            400,
            "invalid_body",
        )
        .await;
    }
    // Too large: announced, and sent without announcing its length.
    let huge = format!(
        "{{\"msgId\":\"big\",\"pad\":\"{}\"}}",
        "x".repeat(BODY_LIMIT)
    );
    assert_refused(
        post_signed(&app, &now, APP_SECRET, huge.clone()).await,
        413,
        "body_too_large",
    )
    .await;
    let chunks: Vec<Result<String, std::io::Error>> =
        vec![Ok(huge[..10].to_owned()), Ok(huge[10..].to_owned())];
    let streamed = app
        .client
        .post(robot_url(&app, "default"))
        .header("timestamp", &now)
        .header("sign", sign(&now, APP_SECRET))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_refused(streamed, 413, "body_too_large").await;
    // An app without a robot endpoint, and the wrong method.
    let unknown = app
        .client
        .post(robot_url(&app, "nope"))
        .header("timestamp", &now)
        .header("sign", sign(&now, APP_SECRET))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_refused(unknown, 404, "unknown_app").await;
    let get = app
        .client
        .get(robot_url(&app, "default"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);

    assert_eq!(app.store.count().await.unwrap(), 0, "nothing stored");
    let metrics = app.metrics().await;
    for (reason, n) in [
        ("sign_mismatch", 3.0),
        ("timestamp_out_of_window", 2.0),
        ("missing_header", 2.0),
        ("invalid_timestamp", 1.0),
        ("invalid_body", 4.0),
        ("body_too_large", 2.0),
    ] {
        let sample =
            format!("dinghook_callbacks_rejected_total{{app=\"default\",reason=\"{reason}\"}}");
        assert_eq!(metric(&metrics, &sample), n, "{sample}\n{metrics}");
    }
    assert!(!metrics.contains(APP_SECRET));
    // Still serving.
    assert_stored_reply(post_message(&app, &message("msg-after")).await).await;
    assert_eq!(app.store.count().await.unwrap(), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_encrypted_variant_is_opened_with_the_apps_aes_key() {
    let (_fake, url) = fake().await;
    let app = app(&url).await;
    let cipher = support::sender();
    let now = now_millis().to_string();
    // `{"encrypt": …}` alone, and with the callback's signed query.
    let sealed = support::seal(&cipher, &message("msg-enc-1").to_string());
    assert_stored_reply(post_signed(&app, &now, APP_SECRET, sealed.body()).await).await;
    let sealed = support::seal(&cipher, &message("msg-enc-2").to_string());
    let with_query = app
        .client
        .post(format!("{}?{}", robot_url(&app, "default"), sealed.query()))
        .header("timestamp", &now)
        .header("sign", sign(&now, APP_SECRET))
        .body(sealed.body())
        .send()
        .await
        .unwrap();
    assert_stored_reply(with_query).await;
    for id in ["msg-enc-1", "msg-enc-2"] {
        let row = app
            .store
            .find_by_dedup_key(&format!("robot:{id}"))
            .await
            .unwrap()
            .expect("decrypted and stored");
        let payload: Value = serde_json::from_str(&row.payload).unwrap();
        assert_eq!(payload["msgId"], id);
    }
    // Encrypted under another key, or with a query signature that does not match.
    let other = dinghook::crypto::CallbackCipher::from_strings(
        support::TOKEN,
        "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij",
        &[],
        support::OWNER_KEY,
    )
    .unwrap();
    let foreign = support::seal(&other, &message("msg-enc-3").to_string());
    let refused = post_signed(&app, &now, APP_SECRET, foreign.body()).await;
    assert_eq!(refused.status(), 400);
    let sealed = support::seal(&cipher, &message("msg-enc-4").to_string());
    let bad_query = app
        .client
        .post(format!(
            "{}?msg_signature=00&timestamp={}&nonce=n",
            robot_url(&app, "default"),
            sealed.timestamp
        ))
        .header("timestamp", &now)
        .header("sign", sign(&now, APP_SECRET))
        .body(sealed.body())
        .send()
        .await
        .unwrap();
    assert_refused(bad_query, 401, "signature_mismatch").await;
    assert_eq!(app.store.count().await.unwrap(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_programs_handler_receives_the_typed_message() {
    let (fake, url) = fake().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RobotMessage>();
    let tx = Arc::new(tx);
    let handlers = RegistryBuilder::new()
        .named("war-room.ack")
        .on_robot_message(move |message, _ctx| {
            let tx = Arc::clone(&tx);
            async move {
                tx.send(message)
                    .map_err(|e| HandlerError::permanent(e.to_string()))
            }
        });
    let app = app_with(&url, Backend::Sqlite, handlers).await.unwrap();
    assert_stored_reply(post_message(&app, &message("msg-typed-1")).await).await;
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("handler ran")
        .expect("a message");
    assert_eq!(got.msg_id, "msg-typed-1");
    assert_eq!(got.text(), Some("ack INC-42"));
    assert_eq!(got.conversation_type, ConversationType::Group);
    assert_eq!(got.conversation_id, "cidwarroom==");
    assert_eq!(got.sender_staff_id.as_deref(), Some("staff-ann"));
    assert_eq!(got.sender_nick.as_deref(), Some("Ann"));
    assert_eq!(got.robot_code.as_deref(), Some("dingrobotcode"));
    assert!(got.is_in_at_list);
    assert_eq!(got.at_users.len(), 2);
    assert_eq!(got.at_users[1].staff_id.as_deref(), Some("staff-bob"));
    // A Stream delivery reaches the same handler, typed the same way.
    fake.stream_push_robot(vec![
        json!({"msgId": "msg-typed-2", "text": {"content": "status?"}}),
    ])
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("handler ran")
        .expect("a message");
    assert_eq!(got.msg_id, "msg-typed-2");
    assert_eq!(got.text(), Some("status?"));
    assert!(
        got.session_webhook.is_some(),
        "the fake fills the session webhook"
    );
    assert!(!format!("{got:?}").contains("session="));
    app.wait_for_state("robot:msg-typed-2", dinghook::store::EventState::Done)
        .await;
    app.stop().await;
}

/// Submits `action` through the HTTP API and waits until it is done or dead.
async fn act(app: &TestApp, key: &str, action: &Value) -> Value {
    let base = format!("http://{}", app.api_addr.expect("the API listens"));
    let response = app
        .client
        .post(format!("{base}/api/v1/apps/default/actions"))
        .bearer_auth(API_TOKEN)
        .header("Idempotency-Key", key)
        .json(action)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_i64().expect("an id");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view: Value = app
            .client
            .get(format!("{base}/api/v1/actions/{id}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["state"] == "done" || view["state"] == "dead" {
            return view;
        }
        assert!(Instant::now() < deadline, "action stuck: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn event_id(app: &TestApp, msg_id: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(row) = app
            .store
            .find_by_dedup_key(&format!("robot:{msg_id}"))
            .await
            .unwrap()
        {
            return row.id;
        }
        assert!(Instant::now() < deadline, "{msg_id} not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn robot_reply_uses_the_session_webhook_while_valid_then_the_group_api() {
    replies(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_robot_reply_uses_the_session_webhook_while_valid_then_the_group_api() {
    replies(Backend::Postgres).await;
}

async fn replies(backend: Backend) {
    let (fake, url) = fake().await;
    let Some(app) = app_with(&url, backend, RegistryBuilder::new()).await else {
        return;
    };
    let reply = |event_id: i64, text: &str| json!({"type": "robot_reply", "event_id": event_id, "msgtype": "text", "text": {"content": text}});

    // 1. A Stream message with the fake's session webhook, valid 90 minutes.
    fake.stream_push_robot(vec![
        json!({"msgId": "msg-reply-1", "conversationType": "2",
        "conversationId": "cidwarroom==", "robotCode": "dingrobotcode"}),
    ])
    .unwrap();
    let id = event_id(&app, "msg-reply-1").await;
    let done = act(&app, "reply-1", &reply(id, "acknowledged")).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["via"], "session_webhook", "{done}");
    let sent = fake.session_messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0]["body"],
        json!({"msgtype": "text", "text": {"content": "acknowledged"}})
    );
    assert!(fake.robot_messages().is_empty());

    // 2. Over HTTP, its session webhook expired: the group API, sampleText into the group.
    let expired_at = now_millis() - 1_000;
    let mut expired = message("msg-reply-2");
    expired["sessionWebhook"] = json!(fake.robot_session(expired_at));
    expired["sessionWebhookExpiredTime"] = json!(expired_at);
    assert_stored_reply(post_message(&app, &expired).await).await;
    let id = event_id(&app, "msg-reply-2").await;
    let done = act(&app, "reply-2", &reply(id, "on it")).await;
    assert_eq!(done["result"]["via"], "group_message", "{done}");
    let group = fake.robot_messages();
    assert_eq!(group.len(), 1);
    assert_eq!(group[0]["openConversationId"], "cidwarroom==");
    assert_eq!(group[0]["robotCode"], "dingrobotcode");
    assert_eq!(group[0]["msgKey"], "sampleText");
    let param: Value = serde_json::from_str(group[0]["msgParam"].as_str().unwrap()).unwrap();
    assert_eq!(param, json!({"content": "on it"}));
    assert_eq!(
        fake.session_messages().len(),
        1,
        "the expired webhook was not called"
    );

    // 3. The message says the webhook is valid, DingTalk says the session is gone (300001):
    //    nothing was posted, so the group API sends it, as markdown.
    let mut gone = message("msg-reply-3");
    gone["sessionWebhook"] = json!(fake.robot_session(now_millis() - 1));
    gone["sessionWebhookExpiredTime"] = json!(now_millis() + 3_600_000);
    assert_stored_reply(post_message(&app, &gone).await).await;
    let id = event_id(&app, "msg-reply-3").await;
    let markdown = json!({"type": "robot_reply", "event_id": id, "msgtype": "markdown",
        "markdown": {"title": "INC-42", "text": "**mitigated**"}});
    let done = act(&app, "reply-3", &markdown).await;
    assert_eq!(done["result"]["via"], "group_message", "{done}");
    let group = fake.robot_messages();
    assert_eq!(group.len(), 2);
    assert_eq!(group[1]["msgKey"], "sampleMarkdown");

    // 4. A one-to-one chat whose webhook expired: the one-to-one API, to the sender's user id.
    fake.add_user(json!({"userid": "staff-ann"}));
    let single_message = |msg_id: &str, sender: Option<&str>| {
        let mut single = message(msg_id);
        single["conversationType"] = json!("1");
        single["conversationId"] = json!("cidsingle==");
        single["sessionWebhook"] = json!(fake.robot_session(expired_at));
        single["sessionWebhookExpiredTime"] = json!(expired_at);
        match sender {
            Some(sender) => single["senderStaffId"] = json!(sender),
            None => drop(single.as_object_mut().unwrap().remove("senderStaffId")),
        }
        single
    };
    assert_stored_reply(
        post_message(&app, &single_message("msg-reply-4", Some("staff-ann"))).await,
    )
    .await;
    let id = event_id(&app, "msg-reply-4").await;
    let done = act(&app, "reply-4", &reply(id, "on my way")).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["via"], "oto_message", "{done}");
    assert!(
        done["result"]["process_query_key"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{done}"
    );
    let oto = fake.robot_oto_messages();
    assert_eq!(oto.len(), 1);
    assert_eq!(oto[0]["robotCode"], "dingrobotcode");
    assert_eq!(oto[0]["userIds"], json!(["staff-ann"]));
    assert_eq!(oto[0]["msgKey"], "sampleText");
    let param: Value = serde_json::from_str(oto[0]["msgParam"].as_str().unwrap()).unwrap();
    assert_eq!(param, json!({"content": "on my way"}));
    assert_eq!(
        fake.robot_messages().len(),
        2,
        "a one-to-one reply went to a group"
    );
    // A sender DingTalk does not know (invalidStaffIdList): dead, not reported done.
    assert_stored_reply(
        post_message(&app, &single_message("msg-reply-4b", Some("staff-gone"))).await,
    )
    .await;
    let id = event_id(&app, "msg-reply-4b").await;
    let dead = act(&app, "reply-4b", &reply(id, "hello?")).await;
    assert_eq!(dead["state"], "dead", "{dead}");
    assert!(
        dead["error"]
            .as_str()
            .unwrap_or_default()
            .contains("invalidStaffIdList"),
        "{dead}"
    );
    // No sender id to write to: dead, saying so.
    assert_stored_reply(post_message(&app, &single_message("msg-reply-4c", None)).await).await;
    let id = event_id(&app, "msg-reply-4c").await;
    let dead = act(&app, "reply-4c", &reply(id, "too late")).await;
    assert_eq!(dead["state"], "dead", "{dead}");
    assert!(
        dead["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nowhere else"),
        "{dead}"
    );
    assert_eq!(fake.robot_oto_messages().len(), 1);

    // 5. A session webhook given directly; one that is not on DingTalk's host is not called.
    let direct = json!({"type": "robot_reply", "session_webhook": fake.robot_session(now_millis() + 60_000),
        "msgtype": "text", "text": {"content": "direct"}});
    let done = act(&app, "reply-5", &direct).await;
    assert_eq!(done["result"]["via"], "session_webhook", "{done}");
    // The API shows that it was given, not what it is (a credential); the stored action kept
    // it to run.
    assert_eq!(done["request"]["session_webhook"], "[set]", "{done}");
    assert_eq!(done["request"]["text"]["content"], "direct", "{done}");
    assert!(!done.to_string().contains("session="), "{done}");
    // Nor does the stored event's payload, through the API; nor a robot message's own webhook.
    let base = format!("http://{}", app.api_addr.expect("the API listens"));
    let mut shown = Vec::new();
    for id in [
        done["id"].as_i64().unwrap(),
        event_id(&app, "msg-reply-4b").await,
    ] {
        let event: Value = app
            .client
            .get(format!("{base}/api/v1/events/{id}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(!event.to_string().contains("session="), "{event}");
        shown.push(event);
    }
    assert_eq!(shown[0]["payload"]["action"]["session_webhook"], "[set]");
    assert_eq!(shown[1]["payload"]["sessionWebhook"], "[set]");
    let elsewhere = json!({"type": "robot_reply", "session_webhook": "http://127.0.0.1:9/robot/sendBySession?session=s",
        "msgtype": "text", "text": {"content": "nope"}});
    let dead = act(&app, "reply-6", &elsewhere).await;
    assert_eq!(dead["state"], "dead", "{dead}");
    assert!(
        dead["error"].as_str().unwrap_or_default().contains("oapi"),
        "{dead}"
    );
    // No such event, and an event that is not a robot message.
    let dead = act(&app, "reply-7", &reply(999_999, "x")).await;
    assert_eq!(dead["state"], "dead", "{dead}");
    let action_id = dead["id"].as_i64().unwrap();
    let dead = act(&app, "reply-8", &reply(action_id, "x")).await;
    assert!(
        dead["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not a robot_message"),
        "{dead}"
    );
    // The session token appears in no error.
    assert!(!dead.to_string().contains("session="), "{dead}");
    assert_eq!(fake.session_messages().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_reply_through_the_session_webhook_is_not_held_by_the_quota_reserve() {
    let (fake, url) = fake().await;
    let app = TestApp::spawn_with_handlers_from(move |config| {
        configure(config, &url, None);
        // Under the reserve from the start: metered messages wait, session replies do not.
        config.dingtalk.monthly_quota = 1_000;
        config.handlers.notify_quota_reserve = 2_000;
        RegistryBuilder::new()
    })
    .await;
    fake.add_user(json!({"userid": "staff-ann"}));
    let reply = |event_id: i64| json!({"type": "robot_reply", "event_id": event_id, "msgtype": "text", "text": {"content": "ack"}});
    // A valid session webhook: not metered, so it goes.
    let mut valid = message("msg-quota-1");
    valid["sessionWebhook"] = json!(fake.robot_session(now_millis() + 3_600_000));
    valid["sessionWebhookExpiredTime"] = json!(now_millis() + 3_600_000);
    assert_stored_reply(post_message(&app, &valid).await).await;
    let id = event_id(&app, "msg-quota-1").await;
    let done = act(&app, "quota-1", &reply(id)).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["via"], "session_webhook", "{done}");
    assert_eq!(fake.session_messages().len(), 1);
    // Expired, in a group and one to one: the metered APIs would be needed, so the reserve
    // holds them (dead, saying why), and nothing reaches DingTalk.
    let expired_at = now_millis() - 1_000;
    for (msg_id, conversation_type) in [("msg-quota-2", "2"), ("msg-quota-3", "1")] {
        let mut expired = message(msg_id);
        expired["conversationType"] = json!(conversation_type);
        expired["sessionWebhook"] = json!(fake.robot_session(expired_at));
        expired["sessionWebhookExpiredTime"] = json!(expired_at);
        assert_stored_reply(post_message(&app, &expired).await).await;
        let id = event_id(&app, msg_id).await;
        let dead = act(&app, msg_id, &reply(id)).await;
        assert_eq!(dead["state"], "dead", "{dead}");
        assert!(
            dead["error"]
                .as_str()
                .unwrap_or_default()
                .contains("notification reserve"),
            "{dead}"
        );
    }
    assert!(fake.robot_messages().is_empty());
    assert!(fake.robot_oto_messages().is_empty());
    assert_eq!(fake.session_messages().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_real_server_logs_neither_the_app_secret_nor_a_session_webhook() {
    let (fake, url) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let [port, api_port] = support::free_ports::<2>();
    let api_listen = format!("127.0.0.1:{api_port}");
    let env = [
        ("DINGHOOK_APP_KEY", APP_KEY),
        ("DINGHOOK_APP_SECRET", APP_SECRET),
        ("DINGHOOK_DINGTALK_OAPI_URL", url.as_str()),
        ("DINGHOOK_DINGTALK_API_URL", url.as_str()),
        ("DINGHOOK_RECOVERY", "off"),
        ("DINGHOOK_API_LISTEN", api_listen.as_str()),
        ("DINGHOOK_API_TOKEN", API_TOKEN),
        ("DINGHOOK_LOG", "debug"),
    ];
    let mut server = support::ServerProcess::start(&db, port, &env).await;
    let http = reqwest::Client::new();
    let robot = server.url("/dingtalk/robot/default");
    let post = |timestamp: String, secret: &'static str, body: String| {
        http.post(&robot)
            .header("timestamp", &timestamp)
            .header("sign", sign(&timestamp, secret))
            .body(body)
            .send()
    };
    // Refused, then stored, with webhooks that are expired (by the message, and at DingTalk).
    let now = now_millis().to_string();
    let refused = post(now.clone(), "wrong", message("m-log-0").to_string())
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let expired_at = now_millis() - 1_000;
    let webhooks = [
        fake.robot_session(expired_at),
        fake.robot_session(expired_at),
    ];
    for (i, webhook) in webhooks.iter().enumerate() {
        let mut m = message(&format!("m-log-{}", i + 1));
        m["sessionWebhook"] = json!(webhook);
        m["sessionWebhookExpiredTime"] = json!(if i == 0 {
            expired_at
        } else {
            now_millis() + 3_600_000
        });
        let stored = post(now_millis().to_string(), APP_SECRET, m.to_string())
            .await
            .unwrap();
        assert_eq!(stored.status(), 200);
    }
    // Replies: one falls back because the message says the webhook expired, one because
    // DingTalk refused it; one given a webhook directly that DingTalk refuses, with no group.
    let api = format!("http://{api_listen}/api/v1/apps/default/actions");
    let direct = fake.robot_session(expired_at);
    let mut ids = Vec::new();
    for (key, body) in [
        (
            "log-1",
            json!({"type": "robot_reply", "event_id": 1, "msgtype": "text", "text": {"content": "a"}}),
        ),
        (
            "log-2",
            json!({"type": "robot_reply", "event_id": 2, "msgtype": "text", "text": {"content": "b"}}),
        ),
        (
            "log-3",
            json!({"type": "robot_reply", "session_webhook": direct, "msgtype": "text", "text": {"content": "c"}}),
        ),
    ] {
        let accepted: Value = http
            .post(&api)
            .bearer_auth(API_TOKEN)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(accepted["id"].as_i64().expect("accepted"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut views = Vec::new();
    for id in ids {
        loop {
            let view: Value = http
                .get(format!("http://{api_listen}/api/v1/actions/{id}"))
                .bearer_auth(API_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if view["state"] == "done" || view["state"] == "dead" {
                views.push(view);
                break;
            }
            assert!(Instant::now() < deadline, "stuck: {view}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(views[0]["result"]["via"], "group_message", "{}", views[0]);
    assert_eq!(views[1]["result"]["via"], "group_message", "{}", views[1]);
    assert_eq!(views[2]["state"], "dead", "{}", views[2]);
    assert_eq!(fake.robot_messages().len(), 2);
    server.terminate().await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("robot message rejected"),
        "the refusal is logged"
    );
    let sessions: Vec<String> = webhooks
        .iter()
        .chain([&direct])
        .map(|w| w.split("session=").nth(1).unwrap().to_owned())
        .collect();
    let mut secrets = vec![APP_SECRET];
    secrets.extend(sessions.iter().map(String::as_str));
    support::assert_no_secrets(&log, &secrets);
    for view in &views {
        support::assert_no_secrets(&view["error"].to_string(), &secrets[1..]);
    }
}

#[tokio::test]
async fn a_store_that_cannot_write_answers_503_and_a_later_delivery_is_stored() {
    let (_fake, url) = fake().await;
    let slot: Arc<std::sync::Mutex<Option<Arc<support::counting::CountingStore>>>> = Arc::default();
    let keep = Arc::clone(&slot);
    let app = TestApp::spawn_on(
        move |config| {
            configure(config, &url, None);
            config.stream.enabled = false;
            RegistryBuilder::new()
        },
        move |store| {
            let counting = support::counting::CountingStore::new(store);
            *keep.lock().unwrap() = Some(Arc::clone(&counting));
            counting as Arc<dyn dinghook::store::Store>
        },
    )
    .await;
    let counting = slot.lock().unwrap().take().expect("store wrapped");
    counting.set_fail_inserts(true);
    let refused = post_message(&app, &message("msg-outage")).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    counting.set_fail_inserts(false);
    assert_eq!(app.store.count().await.unwrap(), 0);
    assert_stored_reply(post_message(&app, &message("msg-outage")).await).await;
    assert_eq!(app.store.count().await.unwrap(), 1);
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "dinghook_callbacks_rejected_total{app=\"default\",reason=\"store_unavailable\"}"
        ),
        1.0,
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn each_app_has_its_own_endpoint_signed_with_its_own_secret() {
    let (_fake, url) = fake().await;
    let fake_url = url.clone();
    let app = TestApp::spawn_with_handlers_from(move |config| {
        configure(config, &url, None);
        config.stream.enabled = false;
        config.apps = toml::from_str(&format!(
            r#"
[ops]
token = "ops-token-aaaa"
aes_key = "zyxwvutsrqponmlkjihgfedcba9876543210ABCDEFG"
owner_key = "dingopsowner"
app_key = "dingopsapp"
app_secret = "ops-robot-secret"
oapi_url = "{fake_url}"
api_url = "{fake_url}"
[quiet]
token = "quiet-token-aaaa"
aes_key = "zyxwvutsrqponmlkjihgfedcba9876543210ABCDEFG"
owner_key = "dingquietowner"
"#
        ))
        .unwrap();
        RegistryBuilder::new()
    })
    .await;
    let now = now_millis().to_string();
    let body = message("msg-ops-1").to_string();
    let to = |name: &str, secret: &str| {
        app.client
            .post(robot_url(&app, name))
            .header("timestamp", &now)
            .header("sign", sign(&now, secret))
            .body(body.clone())
            .send()
    };
    // The default app's secret does not open ops's endpoint, nor the reverse.
    assert_refused(to("ops", APP_SECRET).await.unwrap(), 401, "sign_mismatch").await;
    assert_refused(
        to("default", "ops-robot-secret").await.unwrap(),
        401,
        "sign_mismatch",
    )
    .await;
    // An app without an app_secret has no robot endpoint.
    assert_refused(to("quiet", "").await.unwrap(), 404, "unknown_app").await;
    assert_stored_reply(to("ops", "ops-robot-secret").await.unwrap()).await;
    let rows = app.store.count().await.unwrap();
    assert_eq!(rows, 1);
    let ops = dinghook::store::scoped::for_app(Arc::clone(&app.store), "ops");
    let row = ops
        .find_by_dedup_key("robot:msg-ops-1")
        .await
        .unwrap()
        .expect("stored under ops");
    assert_eq!(row.app, "ops");
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "dinghook_callbacks_rejected_total{app=\"ops\",reason=\"sign_mismatch\"}"
        ),
        1.0,
        "{metrics}"
    );
    app.stop().await;
}
