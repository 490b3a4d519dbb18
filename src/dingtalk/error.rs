//! The error every client call returns, shaped so the dispatcher can decide what to do next.

use std::sync::Arc;
use std::time::Duration;

/// Why a DingTalk call failed.
///
/// Variants keep what DingTalk said (errcode/errmsg for the old API, HTTP status/code/message for
/// the new one) and the request id, because that is what DingTalk support asks for. No variant
/// ever carries the access token or the app secret: URLs are stripped from transport errors since
/// old-API URLs carry the token in the query.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be sent or the answer could not be read (connection refused, reset, …).
    #[error("transport error calling {path}: {source}")]
    Transport {
        /// The API path (never the full URL, which may hold the token).
        path: String,
        /// The underlying error, with its URL removed.
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the configured request time-out. The request may or may not have been
    /// processed, so a non-idempotent call must not be blindly repeated.
    #[error("timed out calling {path}")]
    Timeout {
        /// The API path.
        path: String,
    },
    /// An old-API (`oapi.dingtalk.com`) call answered with a non-zero `errcode`.
    #[error("DingTalk API error {errcode}: {errmsg} (request id {request_id:?})")]
    Api {
        /// DingTalk's `errcode`.
        errcode: i64,
        /// DingTalk's `errmsg`.
        errmsg: String,
        /// DingTalk's `request_id`, when it sent one.
        request_id: Option<String>,
    },
    /// A new-API (`api.dingtalk.com/v1.0`) call answered with an error status.
    #[error("DingTalk API error HTTP {status} {code}: {message} (request id {request_id:?})")]
    ApiV2 {
        /// HTTP status.
        status: u16,
        /// DingTalk's `code`, e.g. `invalidParameter.robotCode.auth`.
        code: String,
        /// DingTalk's `message`.
        message: String,
        /// DingTalk's `requestid`, when it sent one.
        request_id: Option<String>,
    },
    /// DingTalk kept answering with a QPS throttling code after every retry.
    #[error("throttled by DingTalk ({code}) after {attempts} attempts")]
    Throttled {
        /// The last throttling code seen (`90018`, `90002`, `Forbidden.AccessDenied.Qps…`).
        code: String,
        /// How many requests were sent.
        attempts: u32,
    },
    /// The organisation's monthly API quota is used up (90020 / `ApiCountLimitForOrg`).
    /// Retrying before the quota is raised or the month turns cannot succeed.
    #[error("DingTalk monthly API quota exhausted: {message}")]
    QuotaExhausted {
        /// DingTalk's message (it names the count and the quota).
        message: String,
        /// DingTalk's request id, when it sent one.
        request_id: Option<String>,
    },
    /// DingTalk banned this IP for calling too often (`status: 1111`) for longer than we are
    /// willing to wait inside one call.
    #[error("IP banned by DingTalk for {wait:?}")]
    IpBanned {
        /// How long DingTalk asked us to wait.
        wait: Duration,
    },
    /// The call was refused for an invalid or expired token even after one fresh token was fetched.
    #[error("access token rejected by DingTalk ({code}: {message})")]
    InvalidToken {
        /// The errcode or code that rejected it.
        code: String,
        /// DingTalk's message.
        message: String,
    },
    /// No access token could be obtained. Shared between every caller that waited on the same
    /// fetch, hence the `Arc`.
    #[error("could not obtain an access token: {0}")]
    Token(#[source] Arc<Error>),
    /// The answer was not the JSON we expected.
    #[error("could not decode the answer of {path}: {source}")]
    Decode {
        /// The API path.
        path: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The client is not configured for this call (missing agent id, bad base URL, …).
    #[error("DingTalk client configuration: {0}")]
    Config(String),
}

/// Old-API errcodes that mean "the token is bad, get another".
pub(crate) const TOKEN_ERRCODES: [i64; 3] = [40014, 42001, 40001];
/// Old-API errcode for "authentication problem"; only token trouble when its message says so.
pub(crate) const AUTH_ERRCODE: i64 = 88;
/// Old-API throttling errcodes: per-app per-API QPS, global per-API QPS.
pub(crate) const THROTTLE_ERRCODES: [i64; 2] = [90018, 90002];
/// Old-API errcode for the monthly organisation quota.
pub(crate) const QUOTA_ERRCODE: i64 = 90020;
/// Old-API errcode for "system busy, try again".
pub(crate) const BUSY_ERRCODE: i64 = -1;
/// New-API code for the monthly organisation quota.
pub(crate) const QUOTA_CODE: &str = "Forbidden.AccessDenied.ApiCountLimitForOrg";
/// New-API codes for QPS and QPM throttling share this prefix.
pub(crate) const THROTTLE_CODE_PREFIXES: [&str; 2] =
    ["Forbidden.AccessDenied.Qps", "Forbidden.AccessDenied.Qpm"];
/// New-API code for a missing, invalid or expired token.
pub(crate) const INVALID_AUTH_CODE: &str = "InvalidAuthentication";

impl Error {
    /// True when the same request may succeed later without any change: transport trouble,
    /// time-outs, throttling, bans, system busy, token trouble.
    ///
    /// The dispatcher retries these with its own back-off. Note that [`Error::Timeout`] is
    /// retryable but ambiguous: only retry effects that are idempotent or recorded.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Throttled { .. }
            | Error::IpBanned { .. }
            | Error::InvalidToken { .. } => true,
            Error::Token(inner) => inner.is_retryable(),
            Error::Api { errcode, .. } => {
                *errcode == BUSY_ERRCODE || THROTTLE_ERRCODES.contains(errcode)
            }
            Error::ApiV2 { status, code, .. } => *status >= 500 || code == "systemError",
            Error::QuotaExhausted { .. } | Error::Decode { .. } | Error::Config(_) => false,
        }
    }

    /// True when repeating the same request can never succeed: DingTalk rejected its content
    /// (bad parameter, unknown user, no permission), or we could not understand the answer, or
    /// the client is misconfigured. Such an event should go straight to the dead letters.
    ///
    /// [`Error::QuotaExhausted`] is neither retryable nor permanent: it clears when the month
    /// turns or the quota is raised, so the dispatcher should park the work, not kill it.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Api { .. } | Error::ApiV2 { .. } => !self.is_retryable(),
            Error::Decode { .. } | Error::Config(_) => true,
            Error::Token(inner) => inner.is_permanent(),
            _ => false,
        }
    }

    /// The old-API errcode, if DingTalk sent one.
    pub fn errcode(&self) -> Option<i64> {
        match self {
            Error::Api { errcode, .. } => Some(*errcode),
            _ => None,
        }
    }

    /// The new-API code, if DingTalk sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::ApiV2 { code, .. } => Some(code),
            _ => None,
        }
    }

    /// DingTalk's request id, if it sent one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Error::Api { request_id, .. }
            | Error::ApiV2 { request_id, .. }
            | Error::QuotaExhausted { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }

    /// Converts a reqwest error, dropping the URL (it can carry `access_token`).
    pub(crate) fn from_reqwest(path: &str, err: reqwest::Error) -> Error {
        if err.is_timeout() {
            Error::Timeout {
                path: path.to_owned(),
            }
        } else {
            Error::Transport {
                path: path.to_owned(),
                source: err.without_url(),
            }
        }
    }
}
