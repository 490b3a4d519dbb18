//! Known secret values through every path the server and the CLI have: the probe, each event
//! type the built-in handlers act on, every kind of bad request, DingTalk failing (5xx,
//! throttling, an expired token, refused credentials), failed-push recovery, shutdown, and the
//! CLI's commands and errors. None of the values may appear in the server's log (at debug
//! level), in an error body, or in the CLI's output.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dinghook::crypto::{random_nonce, signature, CallbackCipher, Sealed};
use dinghook::time::now_millis;
use fake_dingtalk::{FakeDingTalk, FaultSpec};
use serde_json::{json, Value};
use support::{ServerProcess, AES_KEY, OWNER_KEY, TOKEN};

const APP_SECRET: &str = "AppSecret-7hQm2-never-in-logs";
/// A key of the previous rotation, also accepted: as secret as the current one.
const PREVIOUS_AES_KEY: &str = "PrevKeyPrevKeyPrevKeyPrevKeyPrevKeyPrevKey0";

/// Every form in which a secret could leak: as configured, and the AES keys' raw bytes in hex.
fn secret_forms() -> Vec<String> {
    let mut forms = vec![
        TOKEN.to_owned(),
        AES_KEY.to_owned(),
        PREVIOUS_AES_KEY.to_owned(),
        APP_SECRET.to_owned(),
    ];
    for key in [AES_KEY, PREVIOUS_AES_KEY] {
        let bytes = base64_decode(&format!("{key}="));
        assert_eq!(bytes.len(), 32, "{key} decodes to an AES-256 key");
        forms.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
    }
    forms
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    use base64::{alphabet, Engine};
    // DingTalk's keys may end in bits a strict decoder refuses; dinghook accepts them too.
    let lenient = GeneralPurpose::new(
        &alphabet::STANDARD,
        general_purpose::PAD
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    lenient.decode(s).expect("base64")
}

/// Fails naming `what` (never the secret itself, which the failure message would print).
fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    eprintln!(
        "checking {what} ({} bytes) for {} secret values",
        text.len(),
        secrets.len()
    );
    support::assert_no_secrets(text, &secrets);
}

fn cli(db: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dinghook"));
    command
        .args(args)
        .env_clear()
        .env("DINGHOOK_STORE_URL", format!("sqlite://{}", db.display()))
        .env("DINGHOOK_TOKEN", TOKEN)
        .env("DINGHOOK_AES_KEY", AES_KEY)
        .env("DINGHOOK_PREVIOUS_AES_KEYS", PREVIOUS_AES_KEY)
        .env("DINGHOOK_OWNER_KEY", OWNER_KEY)
        .env("DINGHOOK_APP_KEY", "dingsecretsapp")
        .env("DINGHOOK_APP_SECRET", APP_SECRET);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run dinghook")
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_error_bodies_or_cli_output() {
    let secrets = secret_forms();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("data").join("dinghook.db");

    let (fake, fake_url) = FakeDingTalk::spawn().await.expect("fake DingTalk");
    fake.set_credentials("dingsecretsapp", APP_SECRET);
    fake.add_group(json!({"openConversationId": "cidSecrets", "title": "Secrets", "coolAppCode": "COOLAPP-secrets"}));
    fake.add_user(
        json!({"userid": "u-secrets", "unionid": "union-secrets", "name": "S", "active": true}),
    );
    fake.load_failed_callbacks(vec![json!({
        "call_back_tag": "chat_update_title",
        "event_time": now_millis(),
        "chat_update_title": {
            "corpid": "dingcorp",
            "callbackData": {"eventId": "s-recovered", "title": "t", "ChatId": "chat1"}
        }
    })]);

    let port = support::free_port();
    let mut server = ServerProcess::start(
        &db,
        port,
        &[
            ("DINGHOOK_LOG", "debug"),
            ("DINGHOOK_PREVIOUS_AES_KEYS", PREVIOUS_AES_KEY),
            ("DINGHOOK_APP_KEY", "dingsecretsapp"),
            ("DINGHOOK_APP_SECRET", APP_SECRET),
            ("DINGHOOK_AGENT_ID", "77"),
            ("DINGHOOK_DINGTALK_OAPI_URL", &fake_url),
            ("DINGHOOK_DINGTALK_API_URL", &fake_url),
            ("DINGHOOK_POLL_INTERVAL", "50ms"),
            ("DINGHOOK_RETRY_SCHEDULE", "100ms,100ms"),
            ("DINGHOOK_RECOVERY_INTERVAL", "1s"),
            ("DINGHOOK_BODY_LIMIT", "65536"),
        ],
    )
    .await;
    let url = server.url("/dingtalk/callback");
    let http = reqwest::Client::new();
    let cipher = support::sender();
    let mut bodies = String::new();

    // The probe and events each built-in handler acts on, and one nobody handles.
    let events = [
        json!({"EventType": "check_url"}),
        json!({"EventType": "im_cool_app_install", "eventId": "s-install", "CorpId": "dingcorp",
               "coolAppCode": "COOLAPP-secrets", "robotCode": "robotS", "openConversationId": "cidSecrets",
               "operator": "u1", "operateTime": "1641866135051"}),
        json!({"EventType": "chat_update_title", "eventId": "s-title", "ChatId": "chat1", "Title": "renamed",
               "OpenConversationId": "cidSecrets", "TimeStamp": now_millis()}),
        json!({"EventType": "attendance_check_record", "eventId": "s-checkin", "CorpId": "dingcorp",
               "dataList": [{"userId": "u-secrets", "checkTime": now_millis(), "checkByUser": true, "locationResult": "Outside"}]}),
        json!({"EventType": "todo_task_create", "eventId": "s-todo", "CorpId": "dingcorp", "taskId": "task-s",
               "UnionIdList": ["union-secrets"]}),
        json!({"EventType": "some_new_type", "eventId": "s-unknown"}),
    ];
    // DingTalk misbehaving while they run: 5xx, throttling, an expired token.
    fake.fail_next(FaultSpec {
        status: Some(500),
        times: 2,
        ..FaultSpec::default()
    });
    fake.fail_next(FaultSpec {
        errcode: Some(90018),
        times: 2,
        ..FaultSpec::default()
    });
    for event in &events {
        assert!(
            support::deliver(&http, &url, &event.to_string()).await,
            "{event} acknowledged"
        );
    }
    // The same events sealed with the previous key of the rotation.
    let previous = CallbackCipher::from_strings(TOKEN, PREVIOUS_AES_KEY, &[], OWNER_KEY)
        .expect("previous key");
    let sealed = previous
        .seal(
            br#"{"EventType":"some_new_type","eventId":"s-previous"}"#,
            &now_millis().to_string(),
            &random_nonce(),
        )
        .expect("seal");
    let r = http
        .post(format!("{url}?{}", sealed.query()))
        .body(sealed.body())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200, "the previous key is accepted");
    tokio::time::sleep(Duration::from_millis(400)).await;
    fake.expire_token();
    assert!(
        support::deliver(
            &http,
            &url,
            r#"{"EventType":"im_cool_app_uninstall","eventId":"s-uninstall","coolAppCode":"COOLAPP-secrets","openConversationId":"cidSecrets","robotCode":"robotS"}"#
        )
        .await
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // DingTalk refusing our credentials (as after a secret rotation in the console).
    fake.set_credentials("dingsecretsapp", "a-different-secret");
    fake.expire_token();
    assert!(
        support::deliver(
            &http,
            &url,
            r#"{"EventType":"im_cool_app_install","eventId":"s-install-2","coolAppCode":"COOLAPP-secrets","openConversationId":"cidSecrets","robotCode":"robotS"}"#
        )
        .await
    );

    // Every kind of bad request: a 4xx JSON error that names the problem, never a secret.
    let good = support::seal(
        &cipher,
        r#"{"EventType":"some_new_type","eventId":"s-bad"}"#,
    );
    let other_owner = CallbackCipher::from_strings(TOKEN, AES_KEY, &[], "dingsomeoneelse")
        .expect("other owner")
        .seal(
            br#"{"EventType":"x"}"#,
            &now_millis().to_string(),
            &random_nonce(),
        )
        .expect("seal");
    // A bit flipped in the next-to-last block flips the same bit of the last plaintext
    // block: the padding length becomes > 32, which no valid message has.
    let tampered = {
        use base64::Engine;
        let mut raw = base64_decode(&good.encrypt);
        let at = raw.len() - 17;
        raw[at] ^= 0x40;
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    let stale = cipher
        .seal(br#"{"EventType":"x"}"#, "1000000000000", &random_nonce())
        .expect("seal");
    // Signed correctly, so the request gets past the signature to the part that is wrong.
    let signed = |encrypt: &str| {
        let sealed = Sealed {
            msg_signature: signature(TOKEN, &good.timestamp, &good.nonce, encrypt),
            timestamp: good.timestamp.clone(),
            nonce: good.nonce.clone(),
            encrypt: encrypt.to_owned(),
        };
        (sealed.query(), sealed.body())
    };
    let cases: Vec<(String, String)> = vec![
        (
            good.query().replace("signature=", "signature=00"),
            good.body(),
        ),
        (good.query(), json!({"encrypt": tampered}).to_string()),
        signed(&tampered),
        signed(&good.encrypt[..good.encrypt.len() - 8]),
        signed("***not base64***"),
        signed(&good.encrypt[..24]),
        (other_owner.query(), other_owner.body()),
        (stale.query(), stale.body()),
        (good.query(), "not json".into()),
        (good.query(), "{}".into()),
        (String::new(), good.body()),
        (good.query(), "x".repeat(70_000)),
    ];
    for (query, body) in cases {
        // A fresh connection each: the server may close one whose body it refused unread.
        let r = reqwest::Client::new()
            .post(format!("{url}?{query}"))
            .body(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        assert!((400..500).contains(&status), "{status}: {text}");
        let error: Value = serde_json::from_str(&text).expect("a JSON error");
        assert!(
            error["error"].is_object() || error["error"].is_string(),
            "{text}"
        );
        bodies.push_str(&text);
        bodies.push('\n');
    }
    let pages = [
        server.url("/healthz"),
        server.url("/readyz"),
        server.url("/nope"),
        server.ops_url("/metrics"),
        server.ops_url("/readyz"),
    ];
    for page in pages {
        let r = reqwest::Client::new().get(page).send().await.expect("get");
        bodies.push_str(&r.text().await.expect("body"));
    }

    // Let the handlers run their retries and the recovery poller read the failed list.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while fake.failed_callbacks_left() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = server.terminate().await;
    assert!(status.success(), "graceful exit: {status}");

    let log = std::fs::read_to_string(&server.log).expect("server log");
    // The paths above were really taken (so a clean log means something).
    for expected in [
        "signature_mismatch",
        "owner_key_mismatch",
        "bad_base64",
        "bad_ciphertext_length",
        "bad_padding",
        "timestamp_out_of_window",
        "body_too_large",
        "DEBUG",
        "token refreshed",
        "40089",
        "recovered failed pushes",
    ] {
        assert!(
            log.contains(expected),
            "the log shows no {expected:?}:\n{log}"
        );
    }
    assert_clean("the server log", &log, &secrets);
    assert_clean("the error bodies", &bodies, &secrets);

    // The CLI: its commands, and its errors about bad secrets.
    let mut outputs = String::new();
    for args in [
        vec!["check-config"],
        vec!["events", "list", "--json"],
        vec!["events", "stats"],
        vec!["notifications", "list"],
    ] {
        let out = cli(&db, &args, &[]);
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        outputs.push_str(&output_text(&out));
    }
    for (key, value) in [
        ("DINGHOOK_AES_KEY", &AES_KEY[..40]),
        (
            "DINGHOOK_AES_KEY",
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ),
        ("DINGHOOK_PREVIOUS_AES_KEYS", &PREVIOUS_AES_KEY[..42]),
    ] {
        let out = cli(&db, &["check-config"], &[(key, value)]);
        assert!(!out.status.success(), "{key}={value} is refused");
        let text = output_text(&out);
        assert!(text.contains(key) || text.contains("aes_key"), "{text}");
        assert_clean("a check-config error", &text, &secrets);
        assert_clean("a check-config error", &text, &[value.to_owned()]);
    }
    let body = dir.path().join("captured-body.json");
    std::fs::write(&body, good.body()).expect("write the captured body");
    let wrong = good.query().replace("signature=", "signature=ff");
    let body_arg = body.display().to_string();
    let out = cli(&db, &["decrypt", "--query", &wrong, &body_arg], &[]);
    assert!(!out.status.success(), "a bad signature is refused");
    assert!(
        output_text(&out).contains("signature"),
        "{}",
        output_text(&out)
    );
    outputs.push_str(&output_text(&out));
    assert_clean("the CLI's output", &outputs, &secrets);
}
