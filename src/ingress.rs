//! The HTTP surface: DingTalk's callback, `/healthz` and `/readyz`.
//!
//! A callback is verified, decrypted, checked and parsed here; URL checks are answered at
//! once; every other event is handed to the store and the encrypted `success` goes out only
//! after the store says the event is durable. Every rejection is a 4xx with a JSON body
//! `{"error": {"code", "message"}}` whose `code` is stable; a store that cannot write is 503.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::crypto::{now_millis, CallbackCipher, CryptoError};
use crate::event::{Envelope, EnvelopeError};
use crate::forwarded::TrustedProxies;
use crate::store::{Inserted, NewEvent, Source, Store, StoreError};

/// What the callback route needs, shared by all requests.
pub struct IngressState {
    pub cipher: CallbackCipher,
    pub store: Arc<dyn Store>,
    pub body_limit: usize,
    pub replay_window: Duration,
    pub request_timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Poked after each new event is committed, so an idle dispatcher starts at once.
    pub stored: Arc<tokio::sync::Notify>,
    /// For the quota figures in `/metrics`.
    pub client: Option<crate::dingtalk::Client>,
    /// Whose `X-Forwarded-For` names the client in the request span.
    pub trusted_proxies: TrustedProxies,
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
    #[error("the reply could not be sealed: {0}")]
    Seal(CryptoError),
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
            Rejection::Seal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Crypto(CryptoError::SignatureMismatch) => StatusCode::UNAUTHORIZED,
            // Retryable from DingTalk's side: nothing was stored, nothing was acknowledged.
            Rejection::StoreUnavailable(_) | Rejection::Timeout(_) => {
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
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, "callback failed");
        } else {
            tracing::warn!(code = self.code(), error = %self, "callback rejected");
        }
        (status, Json(json!({ "error": error }))).into_response()
    }
}

/// The router: the callback at `callback_path`, health and readiness, JSON 404s. Every
/// request runs in a `request` span with its id and, when served over a socket with
/// [`ConnectInfo`], the client's address (see [`client_addr`]).
pub fn router(state: Arc<IngressState>, callback_path: &str) -> Router {
    let trusted = state.trusted_proxies.clone();
    Router::new()
        .route(callback_path, post(callback))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(move |req: &Request<Body>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // The path only: the query carries nothing secret, but nothing useful either.
                let span = tracing::info_span!(
                    "request",
                    id,
                    method = %req.method(),
                    path = %req.uri().path(),
                    client = tracing::field::Empty,
                );
                if let Some(client) = client_addr(&trusted, req) {
                    span.record("client", tracing::field::display(client));
                }
                span
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The client's address for the logs: the TCP peer, or, when the peer is a trusted proxy, the
/// address its `X-Forwarded-For` names ([`TrustedProxies::client_addr`]). `None` without a
/// peer (a router driven without a socket).
pub fn client_addr<B>(trusted: &TrustedProxies, req: &Request<B>) -> Option<IpAddr> {
    let ConnectInfo(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>()?;
    // A value that is not visible ASCII becomes an entry no address parses from, so the walk
    // stops there as at any other garbage.
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"));
    Some(trusted.client_addr(peer.ip(), forwarded))
}

async fn not_found() -> Response {
    let body = json!({ "error": { "code": "not_found", "message": "no such route" } });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn metrics(State(state): State<Arc<IngressState>>) -> Response {
    let stats = tokio::time::timeout(Duration::from_secs(2), state.store.stats(now_millis())).await;
    state
        .metrics
        .set_queue(stats.ok().and_then(Result::ok).as_ref());
    if let Some(client) = &state.client {
        if let Ok(quota) = tokio::time::timeout(Duration::from_secs(2), client.quota()).await {
            state.metrics.set_quota(&quota, &client.stats());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<IngressState>>) -> Response {
    match tokio::time::timeout(state.request_timeout, state.store.probe()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => not_ready(e.to_string()),
        Err(_) => not_ready(format!(
            "store probe timed out after {:?}",
            state.request_timeout
        )),
    }
}

fn not_ready(message: String) -> Response {
    tracing::warn!(%message, "not ready");
    let body = json!({ "status": "not_ready", "error": { "code": "store_unavailable", "message": message } });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn callback(
    State(state): State<Arc<IngressState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let timeout = state.request_timeout;
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(timeout, handle(&state, query, &headers, body))
        .await
        .map_err(|_| Rejection::Timeout(timeout))
        .and_then(|r| r);
    match result {
        Ok((event_type, outcome, response)) => {
            state
                .metrics
                .event_received(&event_type, outcome, started.elapsed().as_secs_f64());
            Ok(response)
        }
        Err(rejection) => {
            state.metrics.callback_rejected(rejection.code());
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
    let parsed: Body =
        serde_json::from_slice(body).map_err(|e| Rejection::InvalidBody(e.to_string()))?;
    match parsed.encrypt {
        Some(serde_json::Value::String(s)) => Ok(s),
        _ => Err(Rejection::MissingEncrypt),
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Rejection::BodyTooLarge { limit });
    }
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
    state: &IngressState,
    query: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, &'static str, Response), Rejection> {
    // The query is checked before the body is read, so a request without signature fields
    // is refused without waiting for its body.
    let signed = SignedQuery::parse(query.as_deref())?;
    let body = read_body(body, headers, state.body_limit).await?;
    let opened = open_request(
        &state.cipher,
        &signed,
        &body,
        state.replay_window,
        now_millis(),
    )?;

    let (event_type, outcome) = match opened {
        Opened::Check(envelope) => {
            tracing::info!(event_type = %envelope.event_type, "answered DingTalk URL check");
            (envelope.event_type, "check")
        }
        Opened::Event(event) => {
            let event_type = event.event_type.clone();
            let outcome = match state.store.insert(event).await? {
                Inserted::Stored { id } => {
                    state.stored.notify_one();
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
    let sealed = state.cipher.seal_success().map_err(Rejection::Seal)?;
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
    fn the_client_address_comes_from_the_peer_and_trusted_forwarding() {
        let trusted = TrustedProxies::parse(&["127.0.0.1/32"]).unwrap();
        let request = |peer: &str, forwarded: &[&[u8]]| {
            let mut req = Request::new(());
            for value in forwarded {
                req.headers_mut().append(
                    "x-forwarded-for",
                    header::HeaderValue::from_bytes(value).unwrap(),
                );
            }
            req.extensions_mut()
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
            req
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let req = request(
            "127.0.0.1:5000",
            &[b"198.51.100.1", b"203.0.113.7, 127.0.0.1"],
        );
        assert_eq!(client_addr(&trusted, &req), Some(ip("203.0.113.7")));
        let req = request("127.0.0.2:5000", &[b"203.0.113.7"]);
        assert_eq!(client_addr(&trusted, &req), Some(ip("127.0.0.2")));
        // Not ASCII: garbage, so the peer.
        let req = request("127.0.0.1:5000", &[b"203.0.113.7\xff"]);
        assert_eq!(client_addr(&trusted, &req), Some(ip("127.0.0.1")));
        assert_eq!(client_addr(&trusted, &Request::new(())), None);
    }

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
    }
}
