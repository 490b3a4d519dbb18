//! HTTP Push: the callback DingTalk posts events to.
//!
//! A callback is verified, decrypted, checked and parsed here; URL checks are answered at
//! once; every other event is handed to the store and the encrypted `success` goes out only
//! after the store says the event is durable. Every rejection is a 4xx with a JSON body
//! `{"error": {"code", "message"}}` whose `code` is stable; a store that cannot write is 503.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::crypto::{CallbackCipher, CryptoError};
use crate::event::{Envelope, EnvelopeError};
use crate::secret::Secret;
use crate::store::{Inserted, NewEvent, Source, Store, StoreError};
use crate::time::now_millis;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `[callback]`: the HTTP Push callback DingTalk posts to.
pub struct CallbackConfig {
    pub path: String,
    pub token: Secret,
    pub aes_key: Secret,
    /// Old keys still accepted for decryption after a rotation.
    #[serde(deserialize_with = "crate::setting::secret_list")]
    pub previous_aes_keys: Vec<Secret>,
    pub owner_key: String,
    #[serde(deserialize_with = "crate::setting::number")]
    pub body_limit: usize,
    /// Bytes of request bodies held in memory at once, all requests together; a request that
    /// would go over it waits briefly, then gets 503 `busy` without its body being read.
    #[serde(deserialize_with = "crate::setting::number")]
    pub body_budget: usize,
    /// Allowed distance between the request's timestamp and now; zero disables the check.
    #[serde(with = "crate::time::duration_str")]
    pub replay_window: Duration,
    /// Proxies (CIDR ranges or addresses) whose `X-Forwarded-For` names the client in the
    /// logs; empty: the TCP peer is always the client.
    #[serde(deserialize_with = "crate::setting::list_or_csv")]
    pub trusted_proxies: Vec<String>,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            path: "/dingtalk/callback".into(),
            token: Secret::default(),
            aes_key: Secret::default(),
            previous_aes_keys: Vec::new(),
            owner_key: String::new(),
            body_limit: 1024 * 1024,
            body_budget: 32 * 1024 * 1024,
            replay_window: Duration::from_secs(3600),
            trusted_proxies: Vec::new(),
        }
    }
}

/// What the callback route needs, shared by all requests.
pub struct PushState {
    /// The app this callback belongs to (its name labels the metrics).
    pub app: Arc<str>,
    pub cipher: CallbackCipher,
    pub store: Arc<dyn Store>,
    pub body_limit: usize,
    /// The `body_budget`, in KiB (see [`BodyBudget`]).
    pub body_budget: BodyBudget,
    pub replay_window: Duration,
    pub request_timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Poked after each new event is committed, so an idle dispatcher starts at once.
    pub stored: Arc<tokio::sync::Notify>,
    /// The routes that take each event (its deliveries are stored with it).
    pub routing: crate::routes::Routing,
}

/// Why a callback was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("query parameter {0:?} is missing")]
    MissingParameter(&'static str),
    #[error("the body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the body could not be read: {0}")]
    BodyRead(String),
    #[error("the body is not a JSON object: {0}")]
    InvalidBody(String),
    #[error("the body has no string field \"encrypt\"")]
    MissingEncrypt,
    #[error("timestamp {0:?} is not a number of seconds or milliseconds")]
    InvalidTimestamp(String),
    #[error("timestamp {timestamp} is {skew_secs} s away from now; the replay window is ±{window_secs} s")]
    TimestampOutOfWindow {
        timestamp: String,
        skew_secs: i64,
        window_secs: u64,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    InvalidEvent(#[from] EnvelopeError),
    #[error("the event could not be stored, DingTalk will retry: {0}")]
    StoreUnavailable(#[from] StoreError),
    #[error("the request did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the request's body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the reply could not be sealed: {0}")]
    Seal(CryptoError),
    #[error("too many request bodies in flight; try again")]
    Busy,
}

impl Rejection {
    /// The stable code in the error body (and in logs and metrics).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MissingParameter(_) => "missing_parameter",
            Rejection::BodyTooLarge { .. } => "body_too_large",
            Rejection::BodyRead(_) => "body_read_error",
            Rejection::InvalidBody(_) => "invalid_body",
            Rejection::MissingEncrypt => "missing_encrypt",
            Rejection::InvalidTimestamp(_) => "invalid_timestamp",
            Rejection::TimestampOutOfWindow { .. } => "timestamp_out_of_window",
            Rejection::Crypto(e) => e.code(),
            Rejection::InvalidEvent(_) => "invalid_event_json",
            Rejection::StoreUnavailable(_) => "store_unavailable",
            Rejection::Timeout(_) => "timeout",
            Rejection::BodyTimeout(_) => "body_timeout",
            Rejection::Seal(_) => "internal_error",
            Rejection::Busy => "busy",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // The client's stall, not ours: DingTalk never sends less than it announces.
            Rejection::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Rejection::Crypto(CryptoError::SignatureMismatch) => StatusCode::UNAUTHORIZED,
            // Retryable from DingTalk's side: nothing was stored, nothing was acknowledged.
            Rejection::StoreUnavailable(_) | Rejection::Timeout(_) | Rejection::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::Seal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        if let Rejection::Crypto(e) = &self {
            error["dingtalk_code"] = json!(e.dingtalk_code());
        }
        // Shedding load is not a fault: a warning, like any refused request.
        if status.is_server_error() && !matches!(self, Rejection::Busy) {
            tracing::error!(code = self.code(), error = %self, "callback failed");
        } else {
            tracing::warn!(code = self.code(), error = %self, "callback rejected");
        }
        (status, Json(json!({ "error": error }))).into_response()
    }
}

/// The callback route alone, at `callback_path`. The application adds the operator routes
/// ([`crate::ops`]), request ids, the request span and JSON 404s around it.
pub fn router(state: Arc<PushState>, callback_path: &str) -> Router {
    Router::new()
        .route(callback_path, post(callback))
        .with_state(state)
}

async fn callback(
    State(state): State<Arc<PushState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let timeout = state.request_timeout;
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    // Reading the request is the client's part: one that stalls (sends less than its
    // Content-Length, or nothing) gets 408. Storing is ours: a store too slow is 503.
    let read = async {
        // What can be checked without the body is checked first, so a request without
        // signature fields, outside the replay window or announcing too large a body is
        // refused without a byte of its body read or buffered.
        let signed = SignedQuery::parse(query.as_deref())?;
        check_timestamp(&signed.timestamp, state.replay_window, now_millis())?;
        let declared = declared_length(&headers, state.body_limit)?;
        // The body is held until the reply is sealed, so the reservation is too.
        let reservation = state
            .body_budget
            .reserve(declared.unwrap_or(state.body_limit as u64))
            .await?;
        let body = read_body(body, state.body_limit).await?;
        Ok::<_, Rejection>((signed, body, reservation))
    };
    let result = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(Rejection::BodyTimeout(timeout)),
        Ok(Err(rejection)) => Err(rejection),
        Ok(Ok((signed, body, _reservation))) => {
            tokio::time::timeout_at(deadline, handle(&state, &signed, &body))
                .await
                .map_err(|_| Rejection::Timeout(timeout))
                .and_then(|r| r)
        }
    };
    match result {
        Ok((event_type, outcome, response)) => {
            state.metrics.event_received(
                &state.app,
                &event_type,
                outcome,
                started.elapsed().as_secs_f64(),
            );
            Ok(response)
        }
        Err(rejection) => {
            state
                .metrics
                .callback_rejected(&state.app, rejection.code());
            Err(rejection)
        }
    }
}

/// The query parameters DingTalk signs with.
#[derive(Debug, Default)]
pub struct SignedQuery {
    pub signature: String,
    pub timestamp: String,
    pub nonce: String,
}

impl SignedQuery {
    /// Reads `msg_signature` (else `signature`), `timestamp` (else `timeStamp`) and `nonce`.
    pub fn parse(query: Option<&str>) -> Result<Self, Rejection> {
        let mut msg_signature = None;
        let mut signature = None;
        let mut timestamp = None;
        let mut time_stamp = None;
        let mut nonce = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let slot = match key.as_ref() {
                "msg_signature" => &mut msg_signature,
                "signature" => &mut signature,
                "timestamp" => &mut timestamp,
                "timeStamp" => &mut time_stamp,
                "nonce" => &mut nonce,
                _ => continue,
            };
            slot.get_or_insert(value.into_owned());
        }
        Ok(SignedQuery {
            signature: msg_signature
                .or(signature)
                .ok_or(Rejection::MissingParameter("msg_signature"))?,
            timestamp: timestamp
                .or(time_stamp)
                .ok_or(Rejection::MissingParameter("timestamp"))?,
            nonce: nonce.ok_or(Rejection::MissingParameter("nonce"))?,
        })
    }
}

/// Checks a request timestamp (seconds or milliseconds) against the replay window.
pub fn check_timestamp(timestamp: &str, window: Duration, now_ms: i64) -> Result<(), Rejection> {
    if window.is_zero() {
        return Ok(());
    }
    let value: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Rejection::InvalidTimestamp(timestamp.to_owned()))?;
    // Below 10^11 it is seconds (10^11 ms is 1973; 10^11 s is the year 5138).
    let ms = if value.unsigned_abs() < 100_000_000_000 {
        value.saturating_mul(1000)
    } else {
        value
    };
    let skew = now_ms.saturating_sub(ms);
    if u128::from(skew.unsigned_abs()) > window.as_millis() {
        return Err(Rejection::TimestampOutOfWindow {
            timestamp: timestamp.to_owned(),
            skew_secs: skew / 1000,
            window_secs: window.as_secs(),
        });
    }
    Ok(())
}

/// Extracts `encrypt` from the body `{"encrypt": "..."}`.
pub fn encrypt_field(body: &[u8]) -> Result<String, Rejection> {
    #[derive(serde::Deserialize)]
    struct Body {
        encrypt: Option<serde_json::Value>,
    }
    // serde reads a struct from a JSON array too (`["…"]` as `{"encrypt": "…"}`), so the
    // object is checked for first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Rejection::InvalidBody(
            "expected a JSON object {\"encrypt\": \"…\"}".into(),
        ));
    }
    let parsed: Body =
        serde_json::from_slice(body).map_err(|e| Rejection::InvalidBody(e.to_string()))?;
    match parsed.encrypt {
        Some(serde_json::Value::String(s)) => Ok(s),
        _ => Err(Rejection::MissingEncrypt),
    }
}

/// The body's announced length; refused when it is over `limit`.
pub(super) fn declared_length(headers: &HeaderMap, limit: usize) -> Result<Option<u64>, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Rejection::BodyTooLarge { limit });
    }
    Ok(declared)
}

/// How long a request waits for room in the body budget before it is refused with 503 `busy`.
const BUDGET_WAIT: Duration = Duration::from_millis(500);

/// The bytes of request bodies all in-flight requests may hold at once (`callback.body_budget`).
/// Without it, 400 connections each sending 1 MiB to an unsigned URL took the server from 63 to
/// over 450 MB (the hostile-clients report). Counted in KiB, rounded up, so a budget of many
/// GiB still fits the semaphore's permit count.
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        let kib = (bytes as u64).div_ceil(1024).min(u64::from(u32::MAX)) as usize;
        BodyBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(kib)),
        }
    }

    /// Room for `bytes`, held until the returned permit is dropped.
    pub(super) async fn reserve(
        &self,
        bytes: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Rejection> {
        let kib = u32::try_from(bytes.div_ceil(1024)).map_err(|_| Rejection::Busy)?;
        let acquire = Arc::clone(&self.kib).acquire_many_owned(kib);
        match tokio::time::timeout(BUDGET_WAIT, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Rejection::Busy),
        }
    }
}

pub(super) async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Rejection> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes wraps the limit's own error type; find it in the cause chain.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cause {
            if err.is::<http_body_util::LengthLimitError>() {
                return Rejection::BodyTooLarge { limit };
            }
            cause = err.source();
        }
        Rejection::BodyRead(e.to_string())
    })
}

async fn handle(
    state: &PushState,
    signed: &SignedQuery,
    body: &[u8],
) -> Result<(String, &'static str, Response), Rejection> {
    let opened = open_request(
        &state.cipher,
        signed,
        body,
        state.replay_window,
        now_millis(),
    )?;

    let (event_type, outcome) = match opened {
        Opened::Check(envelope) => {
            tracing::info!(event_type = %envelope.event_type, "answered DingTalk URL check");
            (envelope.event_type, "check")
        }
        Opened::Event(mut event) => {
            let event_type = event.event_type.clone();
            // The app's name as the store writes it (the scoped store sets it too).
            event.app = state.app.to_string();
            state.routing.route(&mut event);
            let routes = event.routes.clone();
            let outcome = match state.store.insert(event).await? {
                Inserted::Stored { id } => {
                    state.stored.notify_one();
                    state.routing.stored(&routes);
                    tracing::debug!(id, %event_type, "event stored");
                    "stored"
                }
                Inserted::Duplicate { id } => {
                    tracing::info!(id, %event_type, "duplicate delivery acknowledged");
                    "duplicate"
                }
            };
            (event_type, outcome)
        }
    };
    let sealed = state
        .cipher
        .seal_success(now_millis())
        .map_err(Rejection::Seal)?;
    Ok((event_type, outcome, Json(sealed).into_response()))
}

/// What a verified, decrypted callback turned out to be.
#[derive(Debug, Clone)]
pub enum Opened {
    /// One of DingTalk's URL checks: answered, never stored.
    Check(Envelope),
    /// An event to store, received at `now_ms`.
    Event(NewEvent),
}

/// Everything the callback does between reading the request and touching the store: the body's
/// `encrypt`, the replay window, the signature, decryption (current key, then previous ones),
/// the owner key, and the envelope of the decrypted JSON. Pure: no I/O, no clock (`now_ms` is
/// passed in), so the fuzzer and the tests run exactly what the server runs.
pub fn open_request(
    cipher: &CallbackCipher,
    signed: &SignedQuery,
    body: &[u8],
    replay_window: Duration,
    now_ms: i64,
) -> Result<Opened, Rejection> {
    let encrypt = encrypt_field(body)?;
    check_timestamp(&signed.timestamp, replay_window, now_ms)?;
    let msg = cipher.open(
        &signed.signature,
        &signed.timestamp,
        &signed.nonce,
        &encrypt,
    )?;
    let (envelope, _) = Envelope::parse(&msg)?;
    if envelope.is_check() {
        return Ok(Opened::Check(envelope));
    }
    let payload =
        String::from_utf8(msg).map_err(|e| EnvelopeError::NotJson(format!("not UTF-8: {e}")))?;
    Ok(Opened::Event(NewEvent::from_envelope(
        envelope,
        payload,
        Source::Push,
        now_ms,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_falls_back_and_timestamp_accepts_either_spelling() {
        let q = SignedQuery::parse(Some("signature=a&timeStamp=1&nonce=n")).unwrap();
        assert_eq!((q.signature.as_str(), q.timestamp.as_str()), ("a", "1"));
        let q =
            SignedQuery::parse(Some("signature=a&msg_signature=b&timestamp=2&nonce=n")).unwrap();
        assert_eq!(q.signature, "b");
        let err = SignedQuery::parse(Some("signature=a&nonce=n")).unwrap_err();
        assert_eq!(err.to_string(), "query parameter \"timestamp\" is missing");
    }

    #[test]
    fn replay_window_understands_seconds_and_milliseconds() {
        let now = 1_700_000_000_000;
        let hour = Duration::from_secs(3600);
        assert!(check_timestamp("1700000000", hour, now).is_ok());
        assert!(check_timestamp("1700000000000", hour, now).is_ok());
        assert!(check_timestamp("1699999000000", hour, now).is_ok());
        assert_eq!(
            check_timestamp("1690000000000", hour, now)
                .unwrap_err()
                .code(),
            "timestamp_out_of_window"
        );
        assert_eq!(
            check_timestamp("1710000000", hour, now).unwrap_err().code(),
            "timestamp_out_of_window"
        );
        assert_eq!(
            check_timestamp("abc", hour, now).unwrap_err().code(),
            "invalid_timestamp"
        );
        assert!(check_timestamp("abc", Duration::ZERO, now).is_ok());
        assert!(check_timestamp(&i64::MIN.to_string(), hour, now).is_err());
    }

    #[test]
    fn open_request_tells_checks_from_events_and_reports_each_step() {
        let cipher = CallbackCipher::from_strings(
            "t",
            "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij",
            &[],
            "dingowner",
        )
        .unwrap();
        let now = 1_700_000_000_000;
        let open = |msg: &[u8], timestamp: &str| {
            let sealed = cipher.seal(msg, timestamp, "n").unwrap();
            let signed = SignedQuery::parse(Some(&sealed.query())).unwrap();
            open_request(
                &cipher,
                &signed,
                sealed.body().as_bytes(),
                Duration::from_secs(60),
                now,
            )
        };
        let ts = now.to_string();
        match open(br#"{"EventType":"check_url"}"#, &ts).unwrap() {
            Opened::Check(envelope) => assert_eq!(envelope.event_type, "check_url"),
            other => panic!("{other:?}"),
        }
        match open(br#"{"EventType":"x","eventId":"e1"}"#, &ts).unwrap() {
            Opened::Event(event) => {
                assert_eq!(event.dedup_key, "event:e1");
                assert_eq!((event.source, event.received_at), (Source::Push, now));
            }
            other => panic!("{other:?}"),
        }
        let code = |r: Result<Opened, Rejection>| r.unwrap_err().code();
        assert_eq!(code(open(b"[1]", &ts)), "invalid_event_json");
        assert_eq!(code(open(b"{}", "1")), "timestamp_out_of_window");
        let signed = SignedQuery::parse(Some("signature=00&timestamp=1&nonce=n")).unwrap();
        let body = br#"{"encrypt":"abc"}"#;
        let rejected = open_request(&cipher, &signed, body, Duration::ZERO, now);
        assert_eq!(code(rejected), "signature_mismatch");
    }

    #[test]
    fn body_must_be_an_object_with_a_string_encrypt() {
        assert_eq!(encrypt_field(br#"{"encrypt":"x"}"#).unwrap(), "x");
        assert_eq!(encrypt_field(b"{}").unwrap_err().code(), "missing_encrypt");
        assert_eq!(
            encrypt_field(br#"{"encrypt":1}"#).unwrap_err().code(),
            "missing_encrypt"
        );
        assert_eq!(
            encrypt_field(b"not json").unwrap_err().code(),
            "invalid_body"
        );
        assert_eq!(encrypt_field(b"[]").unwrap_err().code(), "invalid_body");
        // An array whose item would fill the struct's only field is still not an object.
        assert_eq!(
            encrypt_field(br#"["abc"]"#).unwrap_err().code(),
            "invalid_body"
        );
        assert_eq!(encrypt_field(b" \n {\"encrypt\":\"x\"}").unwrap(), "x");
    }
}
