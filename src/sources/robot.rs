//! Robot messages over HTTP: DingTalk POSTs a message to the app's robot (an @-mention in a
//! group, a one-to-one chat) to `POST /dingtalk/robot/<app>` on the public listener.
//!
//! DingTalk signs the request with two headers (its "receive messages" page for robots of
//! internal apps): `timestamp`, epoch milliseconds, and `sign`, the base64 of
//! HMAC-SHA256 with the app's AppSecret as the key over `timestamp + "\n" + AppSecret`. A
//! request whose timestamp is more than an hour from now is not DingTalk's (the same page), nor
//! one whose `sign` differs (compared in constant time). The signature covers neither the body
//! nor the path: it proves the sender knows the AppSecret, and the hour bounds a replay, which
//! de-duplication by `msgId` makes harmless.
//!
//! The body is the message JSON, or `{"encrypt": "…"}` encrypted with the app's callback
//! `aes_key` like event callbacks (then the query's `msg_signature`, `timestamp` and `nonce`
//! are verified too when they are present). The message is stored as the Stream source stores
//! it (type `robot_message`, key `robot:<msgId>`: one row whichever way and however often it
//! comes) before the 200 `{}` is sent. Every refusal is a 4xx with push's JSON error body,
//! counted in `callback_rejected` by code; a store that cannot write is 503.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use super::push::{check_timestamp, BodyBudget, Rejection, SignedQuery};
use crate::crypto::CallbackCipher;
use crate::event::{string_ci, ROBOT_MESSAGE};
use crate::secret::Secret;
use crate::store::{Inserted, NewEvent, Source, Store};
use crate::time::now_millis;

/// The robot endpoints' path: `/dingtalk/robot/<app>` (`/dingtalk/robot/default` for the
/// top-level app).
pub const ROBOT_PATH: &str = "/dingtalk/robot/{app}";

/// How far a request's `timestamp` may be from now: DingTalk's rule for robot messages.
pub const ROBOT_WINDOW: Duration = Duration::from_secs(3600);

/// The header names DingTalk signs with.
pub const TIMESTAMP_HEADER: &str = "timestamp";
pub const SIGN_HEADER: &str = "sign";

/// What one app's robot endpoint needs.
pub struct RobotState {
    pub app: Arc<str>,
    /// The key of the `sign` header.
    pub app_secret: Secret,
    /// For the encrypted body variant; `None` when the app has no `aes_key`.
    pub cipher: Option<CallbackCipher>,
    pub store: Arc<dyn Store>,
    pub body_limit: usize,
    pub body_budget: BodyBudget,
    pub request_timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Poked after each new message is committed.
    pub stored: Arc<tokio::sync::Notify>,
    pub routing: crate::routes::Routing,
}

/// The robot endpoints of every app that has one, by app name.
pub type RobotApps = HashMap<String, Arc<RobotState>>;

/// Why a robot message was refused.
#[derive(Debug, thiserror::Error)]
pub enum RobotRejection {
    #[error("no robot endpoint for app {0:?}")]
    UnknownApp(String),
    #[error("header {0:?} is missing or not text")]
    MissingHeader(&'static str),
    #[error("the sign header does not match the timestamp and the app's AppSecret")]
    SignMismatch,
    #[error("the body is encrypted but the app has no aes_key")]
    NoAesKey,
    #[error(transparent)]
    Request(#[from] Rejection),
}

impl RobotRejection {
    /// The stable code in the error body, the logs and `callback_rejected`.
    pub fn code(&self) -> &'static str {
        match self {
            RobotRejection::UnknownApp(_) => "unknown_app",
            RobotRejection::MissingHeader(_) => "missing_header",
            RobotRejection::SignMismatch => "sign_mismatch",
            RobotRejection::NoAesKey => "no_aes_key",
            RobotRejection::Request(r) => r.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            RobotRejection::UnknownApp(_) => StatusCode::NOT_FOUND,
            RobotRejection::SignMismatch => StatusCode::UNAUTHORIZED,
            RobotRejection::MissingHeader(_) | RobotRejection::NoAesKey => StatusCode::BAD_REQUEST,
            RobotRejection::Request(r) => r.status(),
        }
    }
}

impl IntoResponse for RobotRejection {
    fn into_response(self) -> Response {
        let status = self.status();
        let error = json!({ "code": self.code(), "message": self.to_string() });
        if status.is_server_error() && !matches!(self, RobotRejection::Request(Rejection::Busy)) {
            tracing::error!(code = self.code(), error = %self, "robot message failed");
        } else {
            tracing::warn!(code = self.code(), error = %self, "robot message rejected");
        }
        (status, Json(json!({ "error": error }))).into_response()
    }
}

/// The robot route for `apps` (`POST /dingtalk/robot/{app}`).
pub fn router(apps: RobotApps) -> Router {
    Router::new()
        .route(ROBOT_PATH, post(receive))
        .with_state(Arc::new(apps))
}

/// `sign` for `timestamp`: base64(HMAC-SHA256(key = AppSecret, timestamp + "\n" + AppSecret)).
pub fn sign(timestamp: &str, app_secret: &str) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(app_secret.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Checks the `timestamp` and `sign` headers at `now_ms`: the window first (a stale request
/// costs no HMAC), then the signature in constant time.
pub fn verify(headers: &HeaderMap, app_secret: &Secret, now_ms: i64) -> Result<(), RobotRejection> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or(RobotRejection::MissingHeader(name))
    };
    let timestamp = header(TIMESTAMP_HEADER)?;
    let given = header(SIGN_HEADER)?;
    check_timestamp(timestamp, ROBOT_WINDOW, now_ms)?;
    let expected = sign(timestamp, app_secret.expose());
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(RobotRejection::SignMismatch);
    }
    Ok(())
}

/// The stored form of a robot message, whichever way it came: type `robot_message`, keyed
/// `robot:<msgId>` (a hash of the message when it has none), the message JSON as payload.
/// Stream mode's CALLBACK frames and the HTTP endpoint both store through this, so a message
/// delivered both ways is one row.
pub fn new_event(object: Map<String, Value>, source: Source, now_ms: i64) -> NewEvent {
    let corp_id =
        string_ci(&object, "senderCorpId").or_else(|| string_ci(&object, "chatbotCorpId"));
    let msg_id = string_ci(&object, "msgId");
    let payload = Value::Object(object).to_string();
    let dedup_key = match msg_id {
        Some(id) => format!("robot:{id}"),
        None => {
            use sha2::Digest;
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(payload.as_bytes()))
            )
        }
    };
    NewEvent {
        app: crate::store::scoped::DEFAULT_APP.to_owned(),
        dedup_key,
        event_type: ROBOT_MESSAGE.into(),
        corp_id,
        payload,
        source,
        received_at: now_ms,
        routes: Vec::new(),
    }
}

/// The message of a request body: the JSON object, or the object an `{"encrypt": "…"}` body
/// decrypts to. Pure (the fuzz target and the tests run what the server runs).
pub fn open_body(
    cipher: Option<&CallbackCipher>,
    query: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Value>, RobotRejection> {
    let object = json_object(body)?;
    let encrypted = object.len() == 1 && matches!(object.get("encrypt"), Some(Value::String(_)));
    if !encrypted {
        return Ok(object);
    }
    let Some(cipher) = cipher else {
        return Err(RobotRejection::NoAesKey);
    };
    let encrypt = object
        .get("encrypt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // DingTalk's event callbacks sign the ciphertext in the query; when a robot request
    // carries those parameters they are checked too.
    let msg = match SignedQuery::parse(query) {
        Ok(signed) => cipher
            .open(&signed.signature, &signed.timestamp, &signed.nonce, encrypt)
            .map_err(Rejection::from)?,
        Err(_) => cipher.decrypt(encrypt).map_err(Rejection::from)?,
    };
    json_object(&msg)
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, RobotRejection> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => {
            Err(Rejection::InvalidBody("expected a JSON object (the robot message)".into()).into())
        }
        Err(e) => Err(Rejection::InvalidBody(e.to_string()).into()),
    }
}

async fn receive(
    State(apps): State<Arc<RobotApps>>,
    Path(app): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RobotRejection> {
    let Some(state) = apps.get(&app) else {
        // Not counted: the label would come from the caller.
        return Err(RobotRejection::UnknownApp(app.chars().take(64).collect()));
    };
    let started = std::time::Instant::now();
    let timeout = state.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let read = async {
        // Headers and the announced length first: a forged or stale request is refused
        // without a byte of its body read.
        verify(&headers, &state.app_secret, now_millis())?;
        let declared = super::push::declared_length(&headers, state.body_limit)?;
        let reservation = state
            .body_budget
            .reserve(declared.unwrap_or(state.body_limit as u64))
            .await?;
        let body = super::push::read_body(body, state.body_limit).await?;
        Ok::<_, RobotRejection>((body, reservation))
    };
    let result = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(Rejection::BodyTimeout(timeout).into()),
        Ok(Err(rejection)) => Err(rejection),
        Ok(Ok((body, _reservation))) => {
            tokio::time::timeout_at(deadline, store(state, query.as_deref(), &body))
                .await
                .map_err(|_| RobotRejection::from(Rejection::Timeout(timeout)))
                .and_then(|r| r)
        }
    };
    match result {
        Ok(outcome) => {
            state.metrics.event_received(
                &state.app,
                ROBOT_MESSAGE,
                outcome,
                started.elapsed().as_secs_f64(),
            );
            // DingTalk takes a message in the answer as a reply; an empty object is none.
            Ok(Json(json!({})).into_response())
        }
        Err(rejection) => {
            state
                .metrics
                .callback_rejected(&state.app, rejection.code());
            Err(rejection)
        }
    }
}

async fn store(
    state: &RobotState,
    query: Option<&str>,
    body: &[u8],
) -> Result<&'static str, RobotRejection> {
    let object = open_body(state.cipher.as_ref(), query, body)?;
    let mut event = new_event(object, Source::Push, now_millis());
    event.app = state.app.to_string();
    state.routing.route(&mut event);
    let routes = event.routes.clone();
    match state.store.insert(event).await.map_err(Rejection::from)? {
        Inserted::Stored { id } => {
            state.stored.notify_one();
            state.routing.stored(&routes);
            tracing::debug!(id, app = %state.app, "robot message stored");
            Ok("stored")
        }
        Inserted::Duplicate { id } => {
            tracing::info!(id, app = %state.app, "robot message delivered again; acknowledged");
            Ok("duplicate")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timestamp: &str, sign: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, timestamp.parse().unwrap());
        headers.insert(SIGN_HEADER, sign.parse().unwrap());
        headers
    }

    #[test]
    fn the_sign_is_dingtalks() {
        // Computed independently: python3 -c 'import hmac,hashlib,base64;
        // s=b"this is secret"; print(base64.b64encode(hmac.new(s,
        // b"1577262236757\nthis is secret", hashlib.sha256).digest()))'
        assert_eq!(
            sign("1577262236757", "this is secret"),
            "hmPWwU+7lVdm3ZZz0r9tSfx0L4Q26jWOZr9+Gs6EZQM="
        );
    }

    #[test]
    fn verify_checks_window_then_sign() {
        let secret = Secret::new("s3cret".to_owned());
        let now = 1_700_000_000_000_i64;
        let ts = now.to_string();
        let good = sign(&ts, "s3cret");
        assert!(verify(&headers(&ts, &good), &secret, now).is_ok());
        let code = |r: Result<(), RobotRejection>| r.unwrap_err().code();
        assert_eq!(
            code(verify(&headers(&ts, "AAAA"), &secret, now)),
            "sign_mismatch"
        );
        let other = sign(&ts, "other");
        assert_eq!(
            code(verify(&headers(&ts, &other), &secret, now)),
            "sign_mismatch"
        );
        let stale = (now - 3_601_000).to_string();
        let stale_sign = sign(&stale, "s3cret");
        assert_eq!(
            code(verify(&headers(&stale, &stale_sign), &secret, now)),
            "timestamp_out_of_window"
        );
        assert_eq!(
            code(verify(&HeaderMap::new(), &secret, now)),
            "missing_header"
        );
        assert_eq!(
            code(verify(&headers("abc", &good), &secret, now)),
            "invalid_timestamp"
        );
        let err = verify(&headers(&ts, "AAAA"), &secret, now).unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn bodies_plain_encrypted_and_bad() {
        let cipher = CallbackCipher::from_strings(
            "t",
            "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij",
            &[],
            "dingowner",
        )
        .unwrap();
        let plain = br#"{"msgId":"m1","text":{"content":"hi"}}"#;
        assert_eq!(open_body(None, None, plain).unwrap()["msgId"], "m1");
        let sealed = cipher.seal(plain, "1700000000000", "n").unwrap();
        let body = sealed.body();
        let opened = open_body(Some(&cipher), None, body.as_bytes()).unwrap();
        assert_eq!(opened["msgId"], "m1");
        let opened = open_body(Some(&cipher), Some(&sealed.query()), body.as_bytes()).unwrap();
        assert_eq!(opened["msgId"], "m1");
        let code = |r: Result<Map<String, Value>, RobotRejection>| r.unwrap_err().code();
        let bad_query = "msg_signature=00&timestamp=1&nonce=n";
        assert_eq!(
            code(open_body(Some(&cipher), Some(bad_query), body.as_bytes())),
            "signature_mismatch"
        );
        assert_eq!(code(open_body(None, None, body.as_bytes())), "no_aes_key");
        assert_eq!(code(open_body(None, None, b"not json")), "invalid_body");
        assert_eq!(code(open_body(None, None, b"[1]")), "invalid_body");
        assert_eq!(
            code(open_body(Some(&cipher), None, br#"{"encrypt":"!!"}"#)),
            "bad_base64"
        );
    }

    #[test]
    fn the_key_is_the_msg_id_else_a_hash() {
        let object = |v: Value| v.as_object().cloned().unwrap();
        let event = new_event(
            object(json!({"msgId": "m1", "senderCorpId": "c"})),
            Source::Push,
            5,
        );
        assert_eq!(
            (event.dedup_key.as_str(), event.event_type.as_str()),
            ("robot:m1", ROBOT_MESSAGE)
        );
        assert_eq!(event.corp_id.as_deref(), Some("c"));
        let event = new_event(object(json!({"x": 1})), Source::Push, 5);
        assert!(event.dedup_key.starts_with("sha256:"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever the body, headers and query: an answer, never a panic; and a message that
        /// opens always decodes (leniently) to a robot message.
        #[test]
        fn no_input_panics(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            timestamp in "[0-9a-z ]{0,16}",
            sign in "[A-Za-z0-9+/=]{0,48}",
            query in "[a-z_=&0-9]{0,40}",
        ) {
            let cipher = CallbackCipher::from_strings(
                "t",
                "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij",
                &[],
                "dingowner",
            )
            .unwrap();
            let mut map = HeaderMap::new();
            if let Ok(v) = timestamp.parse() { map.insert(TIMESTAMP_HEADER, v); }
            if let Ok(v) = sign.parse() { map.insert(SIGN_HEADER, v); }
            let _ = verify(&map, &Secret::new("s".to_owned()), 1_700_000_000_000);
            for c in [None, Some(&cipher)] {
                if let Ok(object) = open_body(c, Some(&query), &body) {
                    let _ = crate::event::RobotMessage::from_object(&object);
                    let event = new_event(object, Source::Push, 1);
                    proptest::prop_assert_eq!(event.event_type.as_str(), ROBOT_MESSAGE);
                }
            }
            if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                let _ = crate::event::RobotMessage::from_value(&value);
            }
        }
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[0-9a-z ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    proptest::sample::select(vec![
                        "content",
                        "richText",
                        "text",
                        "downloadCode",
                        "dingtalkId",
                        "staffId"
                    ]),
                    inner,
                    0..4,
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest::proptest! {
        /// Every documented field with any JSON type: a message, never a panic.
        #[test]
        fn any_field_types_decode(
            fields in proptest::collection::btree_map(
                proptest::sample::select(vec![
                    "msgId", "msgtype", "text", "content", "conversationId", "conversationType",
                    "senderId", "senderStaffId", "senderNick", "atUsers", "isInAtList",
                    "sessionWebhook", "sessionWebhookExpiredTime", "robotCode", "createAt",
                ]),
                any_json(),
                0..15,
            ),
            msgtype in proptest::sample::select(vec!["text", "richText", "picture", "audio", ""]),
        ) {
            let mut object: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            object.insert("msgtype".into(), json!(msgtype));
            let message = crate::event::RobotMessage::from_object(&object);
            let _ = message.text();
            let _ = message.session_webhook_at(0);
            let decoded = crate::event::Event::decode_stored(ROBOT_MESSAGE, &Value::Object(object).to_string());
            proptest::prop_assert!(decoded.is_ok());
        }
    }
}
