//! The callback endpoint over real HTTP, with a real SQLite file.

mod support;

use aes::cipher::{BlockEncryptMut, KeyIvInit};
use base64::Engine;
use dinghook::crypto::{self, CallbackCipher};
use dinghook::store::{EventState, ListQuery};
use dinghook::time::now_millis;
use support::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn signed_query(encrypt: &str) -> String {
    let ts = now_millis().to_string();
    let sig = crypto::signature(TOKEN, &ts, "nonce123", encrypt);
    format!("msg_signature={sig}&timestamp={ts}&nonce=nonce123")
}

fn body(encrypt: &str) -> String {
    serde_json::json!({ "encrypt": encrypt }).to_string()
}

/// Raw AES-256-CBC under the test key, no padding added: lets a test choose the plaintext
/// bytes DingTalk's layout checks see.
fn raw_encrypt(mut plain: Vec<u8>) -> String {
    let key = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(AES_KEY)
    .unwrap();
    let n = plain.len();
    cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &key[..16])
        .unwrap()
        .encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut plain, n)
        .unwrap();
    B64.encode(plain)
}

#[tokio::test]
async fn check_url_is_answered_and_not_stored() {
    let app = TestApp::spawn().await;
    for kind in [
        "check_url",
        "check_create_suite_url",
        "check_update_suite_url",
    ] {
        let msg = format!(r#"{{"EventType":"{kind}"}}"#);
        assert_success_reply(app.post_event(&msg).await).await;
    }
    assert_eq!(app.store.count().await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test]
async fn an_event_is_stored_before_the_reply_and_redeliveries_add_nothing() {
    // Receive only, so the row is seen exactly as the callback path left it.
    let app = TestApp::spawn_with(|c| c.dispatch.enabled = false).await;
    let msg = r#"{"EventType":"chat_update_title","EventTime":1663143335567,"CorpId":"dingcorp","eventId":"evt-1","title":"开放平台","chatId":"chat1"}"#;
    assert_success_reply(app.post_event(msg).await).await;
    // The reply has been received: the row must already be there, committed.
    let stored = app
        .store
        .find_by_dedup_key("event:evt-1")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored.event_type, "chat_update_title");
    assert_eq!(stored.corp_id.as_deref(), Some("dingcorp"));
    assert_eq!(stored.payload, msg);
    assert_eq!(stored.state, EventState::Pending);
    assert!((now_millis() - stored.received_at).abs() < 60_000);

    // DingTalk re-delivers with a new timestamp and nonce: acknowledged, not stored again.
    for _ in 0..3 {
        assert_success_reply(app.post_event(msg).await).await;
    }
    assert_eq!(app.store.count().await.unwrap(), 1);

    // Without eventId: BizId + type, and failing that a hash of the plaintext.
    let biz = r#"{"EventType":"im_cool_app_install","BizId":"biz-9"}"#;
    let bare = r#"{"EventType":"user_add_org","UserId":["u1"]}"#;
    for msg in [biz, biz, bare, bare] {
        assert_success_reply(app.post_event(msg).await).await;
    }
    assert_eq!(app.store.count().await.unwrap(), 3);
    assert!(app
        .store
        .find_by_dedup_key("biz:im_cool_app_install:biz-9")
        .await
        .unwrap()
        .is_some());
    app.stop().await;
}

#[tokio::test]
async fn signature_parameter_is_a_fallback_for_msg_signature() {
    let app = TestApp::spawn().await;
    let sealed = seal(&sender(), r#"{"EventType":"x","eventId":"fb"}"#);
    let query = format!(
        "signature={}&timestamp={}&nonce={}",
        sealed.msg_signature, sealed.timestamp, sealed.nonce
    );
    assert_success_reply(app.post_raw(&query, sealed.body()).await).await;
    assert_eq!(app.store.count().await.unwrap(), 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_events_are_all_stored_by_group_commit() {
    let app = TestApp::spawn().await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..300 {
        let app = std::sync::Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let msg = format!(r#"{{"EventType":"attendance_check_record","eventId":"c{i}"}}"#);
            assert_success_reply(app.post_event(&msg).await).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(app.store.count().await.unwrap(), 300);
    let listed = app
        .store
        .list(&ListQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 300);
}

#[tokio::test]
async fn every_bad_input_gets_its_4xx_and_code_and_nothing_is_harmed() {
    let app = TestApp::spawn_with(|c| {
        c.callback.body_limit = 4096;
        c.dispatch.enabled = false;
    })
    .await;
    let good = r#"{"EventType":"chat_update_title","eventId":"keep-me"}"#;
    assert_success_reply(app.post_event(good).await).await;
    let before = app.store.find_by_dedup_key("event:keep-me").await.unwrap();

    let sealed = seal(&sender(), r#"{"EventType":"x","eventId":"never"}"#);
    let ts = &sealed.timestamp;

    // Missing query parameters.
    for query in [
        format!("timestamp={ts}&nonce=n"),
        "msg_signature=a&nonce=n".to_string(),
        format!("msg_signature=a&timestamp={ts}"),
    ] {
        assert_error(
            app.post_raw(&query, sealed.body()).await,
            400,
            "missing_parameter",
        )
        .await;
    }
    // Body not JSON, JSON without encrypt.
    assert_error(
        app.post_raw(&sealed.query(), "not json").await,
        400,
        "invalid_body",
    )
    .await;
    assert_error(
        app.post_raw(&sealed.query(), "{}").await,
        400,
        "missing_encrypt",
    )
    .await;
    assert_error(app.post_raw(&sealed.query(), "").await, 400, "invalid_body").await;
    // A validly signed encrypt inside an array is not the body DingTalk sends: refused, and
    // nothing is stored (checked with the others below).
    let array = format!("[{:?}]", sealed.encrypt);
    assert_error(
        app.post_raw(&sealed.query(), array).await,
        400,
        "invalid_body",
    )
    .await;
    // Signature mismatch: a wrong nonce, and a tampered ciphertext.
    let wrong_nonce = sealed.query().replace(&sealed.nonce, "othernonce");
    assert_error(
        app.post_raw(&wrong_nonce, sealed.body()).await,
        401,
        "signature_mismatch",
    )
    .await;
    let mut tampered = sealed.encrypt.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_error(
        app.post_raw(&sealed.query(), body(&tampered)).await,
        401,
        "signature_mismatch",
    )
    .await;
    // Correctly signed but broken ciphertexts.
    for (encrypt, code) in [
        ("@@not-base64@@".to_string(), "bad_base64"),
        (B64.encode([7u8; 15]), "bad_ciphertext_length"),
        // Truncated: mid-quantum is not base64; whole quanta leave a partial AES block.
        (
            sealed.encrypt[..sealed.encrypt.len() - 3].to_string(),
            "bad_base64",
        ),
        (
            sealed.encrypt[..sealed.encrypt.len() - 24].to_string(),
            "bad_ciphertext_length",
        ),
        (
            B64.encode(&B64.decode(&sealed.encrypt).unwrap()[..32]),
            "bad_padding",
        ),
    ] {
        let response = app.post_raw(&signed_query(&encrypt), body(&encrypt)).await;
        assert_eq!(response.status(), 400, "{code}");
        let value: serde_json::Value = response.json().await.unwrap();
        let got = value["error"]["code"].as_str().unwrap();
        assert!(
            got == code || (code == "bad_padding" && got == "bad_length_field"),
            "{code}: {value}"
        );
    }
    // Bad padding and an out-of-range length field, with chosen plaintext bytes.
    let mut plain = vec![b'r'; 64];
    plain[63] = 0;
    let encrypt = raw_encrypt(plain);
    assert_error(
        app.post_raw(&signed_query(&encrypt), body(&encrypt)).await,
        400,
        "bad_padding",
    )
    .await;
    let mut plain = vec![b'r'; 64];
    plain[16..20].copy_from_slice(&1000u32.to_be_bytes());
    plain[62..].fill(2);
    let encrypt = raw_encrypt(plain);
    assert_error(
        app.post_raw(&signed_query(&encrypt), body(&encrypt)).await,
        400,
        "bad_length_field",
    )
    .await;
    // The owner key of another app: the message says what was received.
    let other = CallbackCipher::from_strings(TOKEN, AES_KEY, &[], "suiteOtherKey").unwrap();
    let response = app.post_sealed(&seal(&other, r#"{"EventType":"x"}"#)).await;
    assert_eq!(response.status(), 400);
    let value: serde_json::Value = response.json().await.unwrap();
    assert_eq!(value["error"]["code"], "owner_key_mismatch");
    assert_eq!(value["error"]["dingtalk_code"], 900010);
    let message = value["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("suiteOtherKey") && message.contains("suite key"),
        "{message}"
    );
    // A decrypted message that is not JSON.
    assert_error(
        app.post_sealed(&seal(&sender(), "hello")).await,
        400,
        "invalid_event_json",
    )
    .await;
    // Over the body limit, with and without a Content-Length.
    let big = body(&"A".repeat(8192));
    assert_error(
        app.post_raw(&sealed.query(), big.clone()).await,
        413,
        "body_too_large",
    )
    .await;
    let stream = futures_stream(big);
    assert_error(
        app.post_raw(&sealed.query(), stream).await,
        413,
        "body_too_large",
    )
    .await;
    // Outside the replay window (default ±1 h), in milliseconds and in seconds.
    for old in [
        (now_millis() - 2 * 3600 * 1000).to_string(),
        (now_millis() / 1000 - 7200).to_string(),
    ] {
        let stale = sender()
            .seal(br#"{"EventType":"x"}"#, &old, "nonce")
            .unwrap();
        assert_error(
            app.post_sealed(&stale).await,
            400,
            "timestamp_out_of_window",
        )
        .await;
    }
    let odd = sender()
        .seal(br#"{"EventType":"x"}"#, "yesterday", "nonce")
        .unwrap();
    assert_error(app.post_sealed(&odd).await, 400, "invalid_timestamp").await;
    // Unknown routes are JSON too.
    let response = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_error(response, 404, "not_found").await;

    // Nothing was stored, the good event is untouched, and the server still serves.
    assert_eq!(app.store.count().await.unwrap(), 1);
    assert_eq!(
        app.store.find_by_dedup_key("event:keep-me").await.unwrap(),
        before
    );
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"after"}"#)
            .await,
    )
    .await;
    assert_eq!(app.store.count().await.unwrap(), 2);
    app.stop().await;
}

/// A body sent chunked, without Content-Length, so the limit is enforced while reading.
fn futures_stream(text: String) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = text
        .into_bytes()
        .chunks(1000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    reqwest::Body::wrap_stream(tokio_stream_iter(chunks))
}

fn tokio_stream_iter(
    items: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static {
    struct Iter(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn replay_window_zero_accepts_old_timestamps() {
    let app = TestApp::spawn_with(|c| c.callback.replay_window = std::time::Duration::ZERO).await;
    let old = sender()
        .seal(
            br#"{"EventType":"x","eventId":"old"}"#,
            "1445827045067",
            "n",
        )
        .unwrap();
    assert_success_reply(app.post_sealed(&old).await).await;
    app.stop().await;
}

#[tokio::test]
async fn events_under_a_previous_aes_key_are_accepted_after_rotation() {
    let old_key = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut";
    let app = TestApp::spawn_with(|c| {
        c.callback.previous_aes_keys = vec![dinghook::secret::Secret::new(old_key)]
    })
    .await;
    let old = CallbackCipher::from_strings(TOKEN, old_key, &[], OWNER_KEY).unwrap();
    // The reply is sealed with the current key, which is what assert_success_reply opens.
    assert_success_reply(
        app.post_sealed(&seal(&old, r#"{"EventType":"x","eventId":"r"}"#))
            .await,
    )
    .await;
    assert_eq!(app.store.count().await.unwrap(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_store_that_cannot_write_answers_503_never_200() {
    let app = TestApp::spawn().await;
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"first"}"#)
            .await,
    )
    .await;
    // Break writes to the events table from outside, as a failing disk would.
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.execute_batch(
        "CREATE TRIGGER broken BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    )
    .unwrap();
    assert_error(
        app.post_event(r#"{"EventType":"x","eventId":"second"}"#)
            .await,
        503,
        "store_unavailable",
    )
    .await;
    // /readyz answers 503 whenever a callback would, although its own probe write (another
    // table) still succeeds.
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    conn.execute_batch("DROP TRIGGER broken").unwrap();
    // The failed event comes back on DingTalk's retry and is stored then.
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"second"}"#)
            .await,
    )
    .await;
    assert_eq!(app.store.count().await.unwrap(), 2);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready again once an event is stored");
    app.stop().await;
}

#[tokio::test]
async fn a_locked_database_times_out_with_503_and_readyz_says_not_ready() {
    let app =
        TestApp::spawn_with(|c| c.request_timeout = std::time::Duration::from_millis(800)).await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_error(
        app.post_event(r#"{"EventType":"x","eventId":"locked"}"#)
            .await,
        503,
        "timeout",
    )
    .await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    conn.execute_batch("COMMIT").unwrap();
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    app.stop().await;
}

/// Values from requests cannot forge log lines: a signed event type with a newline and an
/// escape sequence, and (without any key) a timestamp with CR/LF and U+2028, reach the text
/// log escaped. Every line the server wrote starts like a log line.
#[tokio::test]
async fn request_values_cannot_forge_text_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let mut server = ServerProcess::start(
        &db,
        free_port(),
        &[
            ("DINGHOOK_LOG_FORMAT", "text"),
            ("DINGHOOK_DISPATCH", "off"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let callback = server.url("/dingtalk/callback");
    let evil = "evil\n2026-01-01T00:00:00.000000Z  INFO FORGED line\u{1b}[2J";
    let msg = serde_json::json!({"EventType": evil, "eventId": "inject-1"}).to_string();
    let sealed = seal(&sender(), &msg);
    // Twice: the duplicate is logged at info with its event type.
    for _ in 0..2 {
        let reply = client
            .post(format!("{callback}?{}", sealed.query()))
            .body(sealed.body())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    let reply = client
        .post(format!(
            "{callback}?msg_signature=00&timestamp=%0d%0a1%e2%80%a8%0a&nonce=n"
        ))
        .body(r#"{"encrypt":"AAAA"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    server.terminate().await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("evil\\u{a}"),
        "the event type was logged, escaped:\n{log}"
    );
    assert!(
        log.contains("timestamp \\u{d}\\u{a}1\\u{2028}\\u{a} is"),
        "the timestamp was logged, escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(
            line.starts_with("20") && !line.contains("FORGED line") || line.contains("\\u{a}"),
            "a line the server did not write: {line:?}\n{log}"
        );
    }
    assert!(!log.contains('\u{1b}') && !log.contains('\u{2028}') && !log.contains('\r'));
}

/// A client that sends less than its Content-Length stalls itself: 408 `body_timeout` (the
/// client's fault, a warning), not 503 `timeout` (the server's), and the server goes on.
#[tokio::test]
async fn a_client_that_sends_less_than_its_content_length_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app =
        TestApp::spawn_with(|c| c.request_timeout = std::time::Duration::from_millis(500)).await;
    let sealed = seal(&sender(), r#"{"EventType":"x","eventId":"short"}"#);
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST {}?{} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"encrypt\":",
        app.callback_path,
        sealed.query()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(app
        .metrics()
        .await
        .contains(r#"dinghook_callbacks_rejected_total{app="default",reason="body_timeout"} 1"#));
    assert!(app
        .store
        .find_by_dedup_key("event:short")
        .await
        .unwrap()
        .is_none());
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"after"}"#)
            .await,
    )
    .await;
    app.stop().await;
}

async fn readyz(app: &TestApp) -> reqwest::StatusCode {
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    response.status()
}

/// The PostgreSQL half of `a_store_that_cannot_write_answers_503_never_200`: inserts into `events` fail (a trigger raises,
/// as a full tablespace or a broken table would) while the probe's own write to another table
/// still succeeds; `/readyz` must answer 503 as the callback does, and 200 once an event is
/// stored again.
#[tokio::test]
async fn postgres_readyz_answers_503_while_event_inserts_fail() {
    let Some(url) = support::stores::fresh_postgres_database().await else {
        return;
    };
    let app = TestApp::spawn_with({
        let url = url.clone();
        move |c| {
            c.store.url = url;
            c.dispatch.enabled = false;
        }
    })
    .await;
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"first"}"#)
            .await,
    )
    .await;
    assert_eq!(readyz(&app).await, 200);

    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE FUNCTION refuse_events() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'tablespace on fire'; END $$; \
         CREATE TRIGGER broken BEFORE INSERT ON events \
         FOR EACH ROW EXECUTE FUNCTION refuse_events();",
    )
    .await
    .unwrap();
    // The probe alone would still succeed: it writes another table.
    db.execute(
        "INSERT INTO probe (id, at) VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET at = 0",
        &[],
    )
    .await
    .unwrap();
    assert_error(
        app.post_event(r#"{"EventType":"x","eventId":"second"}"#)
            .await,
        503,
        "store_unavailable",
    )
    .await;
    assert_eq!(readyz(&app).await, 503);
    assert_eq!(
        readyz(&app).await,
        503,
        "still, while no insert has succeeded"
    );

    db.batch_execute("DROP TRIGGER broken ON events")
        .await
        .unwrap();
    // DingTalk's retry stores the event, and the store is ready again.
    assert_success_reply(
        app.post_event(r#"{"EventType":"x","eventId":"second"}"#)
            .await,
    )
    .await;
    assert_eq!(app.store.count().await.unwrap(), 2);
    assert_eq!(
        readyz(&app).await,
        200,
        "ready again once an event is stored"
    );
    app.stop().await;
}
