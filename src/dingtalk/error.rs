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
    #[error("DingTalk API error {errcode} on {path}: {errmsg} (request id {request_id:?})")]
    Api {
        /// The API path (some errcodes mean different things on different paths).
        path: String,
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
    /// DingTalk temporarily disabled these requests (old-API errcodes 90001 and 90003–90017: "your
    /// requests … were temporarily disabled", for all APIs or for this one), or the client is
    /// holding calls back after such an answer. DingTalk states no duration, so the call is not
    /// repeated inside the client: the dispatcher's retry schedule is the (long) back-off.
    #[error("DingTalk temporarily disabled these requests ({errcode}: {message})")]
    Disabled {
        /// The errcode that disabled them.
        errcode: i64,
        /// DingTalk's message, or why the call was held back.
        message: String,
        /// DingTalk's request id, when it sent one (none when the call was held back).
        request_id: Option<String>,
    },
    /// `status_bar/update` answered 41052 and `getsendprogress` says the notification is still
    /// being sent: DingTalk refuses status-bar changes until the send is done. Retry later.
    #[error(
        "work notification {task_id} is still being sent ({progress_in_percent} %, status \
         {status}); DingTalk refuses its status bar until the send is done (41052)"
    )]
    SendInProgress {
        /// The notification's task id.
        task_id: i64,
        /// `getsendprogress`'s `progress_in_percent`.
        progress_in_percent: i64,
        /// `getsendprogress`'s `status` (0 not started, 1 running, 2 done).
        status: i64,
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
    /// Not sent: the call cannot be made as asked (a session webhook that is not on DingTalk's
    /// host, or expired with nothing to fall back on). Permanent.
    #[error("not sent: {0}")]
    Refused(String),
}

// What DingTalk's codes mean. Sources (paraphrased, nothing copied):
// - the global server-API error table, https://open.dingtalk.com/document/development/server-api-error-codes-1
//   (old-API errcodes -1, 33001, 40001, 40014, 42001, 88, 400001, 90001–90017; new-API codes
//   `system.error`, `systemError…`, `system.busy`, `systemBusy`);
// - throttling and quotas, https://open.dingtalk.com/document/development/how-to-process-api-throttling-on-the-dingtalk-server
//   and https://open.dingtalk.com/document/development/call-frequency-limit (90018, 90002,
//   90020, `Forbidden.AccessDenied.*`, the per-IP ban);
// - the pages of the APIs themselves: errcode 500 "系统异常" on
//   https://open.dingtalk.com/document/development/update-work-notification-status-bar,
//   https://open.dingtalk.com/document/development/notification-of-work-withdrawal and
//   https://open.dingtalk.com/document/development/obtain-the-sending-progress-of-asynchronous-sending-of-enterprise-session;
//   400001 on `topapi/workrecord/add`, https://open.dingtalk.com/document/development/new-to-do-items;
//   the codes of `sceneGroup/create` (all refusals but HTTP 500 `system.error`),
//   https://open.dingtalk.com/document/development/create-a-scene-group (docs/dingtalk-war-room.md).

/// Old-API errcodes that mean "the token is bad, get another": 40014 invalid token, 42001
/// expired token, 40001 bad secret or invalid token, 33001 "invalid corp id: check that the
/// access_token is right".
pub(crate) const TOKEN_ERRCODES: [i64; 4] = [40014, 42001, 40001, 33001];
/// Old-API errcode for "authentication problem"; only token trouble when its message says so.
pub(crate) const AUTH_ERRCODE: i64 = 88;
/// Old-API throttling errcodes: per-app per-API QPS, global per-API QPS. Both last a second.
pub(crate) const THROTTLE_ERRCODES: [i64; 2] = [90018, 90002];
/// Old-API errcode for the monthly organisation quota.
pub(crate) const QUOTA_ERRCODE: i64 = 90020;
/// Old-API errcodes for a passing system fault: -1 "system busy" (the table: retry, at most 3
/// times), 400001 "system error", 500 "system exception" (in the body of a 200 answer).
pub(crate) const BUSY_ERRCODES: [i64; 3] = [-1, 400001, 500];
/// Old-API errcodes of the table's "requests temporarily disabled" family that stop every API,
/// not only the one called: 90001 (this server), 90003 (this organisation), 90004 (this
/// CorpId/secret), 90007, 90009, 90011, 90013 (ISV tokens), 90017 (this IP used too many
/// CorpIds).
pub(crate) const DISABLED_ALL_ERRCODES: [i64; 8] =
    [90001, 90003, 90004, 90007, 90009, 90011, 90013, 90017];
/// The rest of the family, 90001–90017 without 90002 (a QPS throttle, retried at once), stop
/// only the API called: 90005, 90006 (too many calls of it by this organisation / app), 90008,
/// 90010, 90012, 90014 (ISV tokens); 90015 and 90016 are not in today's table and are taken
/// as the narrower kind.
pub(crate) const DISABLED_ERRCODES: std::ops::RangeInclusive<i64> = 90001..=90017;
/// The path whose 400001 means a refusal, not a system error: the legacy to-do API refuses a
/// second to-do with the same form content for one person in one day with it.
const WORKRECORD_ADD: &str = "/topapi/workrecord/add";

/// New-API code for the monthly organisation quota.
pub(crate) const QUOTA_CODE: &str = "Forbidden.AccessDenied.ApiCountLimitForOrg";
/// New-API codes for QPS and QPM throttling share this prefix.
pub(crate) const THROTTLE_CODE_PREFIXES: [&str; 2] =
    ["Forbidden.AccessDenied.Qps", "Forbidden.AccessDenied.Qpm"];
/// New-API codes the global table gives for "requests too frequent" (HTTP 400, 429 or 500).
const THROTTLE_CODES: [&str; 2] = ["system.busy", "systemBusy"];
/// New-API code for a missing, invalid or expired token.
pub(crate) const INVALID_AUTH_CODE: &str = "InvalidAuthentication";
/// New-API codes of a passing system fault, sent with HTTP 400 as often as with 500 or 503.
const BUSY_CODES: [&str; 2] = ["system.error", "systemError"];
/// `systemError.…` codes that the table lists as refusals, not faults (the app does not exist,
/// the operation is not permitted). Every other `systemError.…` is a fault.
const REFUSING_SYSTEM_ERROR_CODES: [&str; 2] =
    ["systemError.appNotExists", "systemError.notPermittedAccess"];

/// Which requests a "temporarily disabled" errcode stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every API.
    AllApis,
    /// The API that was called.
    ThisApi,
}

/// What an answer's code means, whatever the API family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Meaning {
    /// Get a new token and send again (once).
    Token,
    /// A QPS/QPM throttle: wait about a second and send again.
    Throttled,
    /// Requests temporarily disabled: stop calling for a while.
    Disabled(Scope),
    /// The monthly quota is used up: no retry can succeed this month.
    Quota,
    /// A passing system fault: send again after a back-off.
    Busy,
    /// DingTalk refused this request; sending it again cannot succeed.
    Refused,
}

/// What an old-API `errcode` (other than 0 and 88) means on `path`.
pub(crate) fn old_api_meaning(path: &str, errcode: i64) -> Meaning {
    if TOKEN_ERRCODES.contains(&errcode) {
        Meaning::Token
    } else if THROTTLE_ERRCODES.contains(&errcode) {
        Meaning::Throttled
    } else if errcode == QUOTA_ERRCODE {
        Meaning::Quota
    } else if DISABLED_ALL_ERRCODES.contains(&errcode) {
        Meaning::Disabled(Scope::AllApis)
    } else if DISABLED_ERRCODES.contains(&errcode) {
        Meaning::Disabled(Scope::ThisApi)
    } else if errcode == 400001 && path == WORKRECORD_ADD {
        Meaning::Refused
    } else if BUSY_ERRCODES.contains(&errcode) {
        Meaning::Busy
    } else {
        Meaning::Refused
    }
}

/// What a new-API error answer (HTTP `status`, `code`) means.
pub(crate) fn new_api_meaning(status: u16, code: &str) -> Meaning {
    if code == INVALID_AUTH_CODE || status == 401 {
        Meaning::Token
    } else if THROTTLE_CODE_PREFIXES.iter().any(|p| code.starts_with(p))
        || THROTTLE_CODES.contains(&code)
        || status == 429
    {
        Meaning::Throttled
    } else if code == QUOTA_CODE || code.ends_with("ApiCountLimitForOrg") {
        Meaning::Quota
    } else if status >= 500 || is_system_error(code) {
        Meaning::Busy
    } else {
        Meaning::Refused
    }
}

/// `system.error`, `systemError`, `systemError.<detail>` (but for the two refusals the table
/// lists) and `<api>.systemError` (e.g. `todo.taskCreate.systemError`).
fn is_system_error(code: &str) -> bool {
    BUSY_CODES.contains(&code)
        || code.ends_with(".systemError")
        || (code.starts_with("systemError.") && !REFUSING_SYSTEM_ERROR_CODES.contains(&code))
}

impl Error {
    /// True when the same request may succeed later without any change: transport trouble,
    /// time-outs, throttling, bans, requests temporarily disabled, system faults, token trouble,
    /// a notification still being sent.
    ///
    /// The dispatcher retries these with its own back-off. Note that [`Error::Timeout`] is
    /// retryable but ambiguous: only retry effects that are idempotent or recorded.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Throttled { .. }
            | Error::IpBanned { .. }
            | Error::Disabled { .. }
            | Error::SendInProgress { .. }
            | Error::InvalidToken { .. } => true,
            Error::Token(inner) => inner.is_retryable(),
            Error::Api { path, errcode, .. } => matches!(
                old_api_meaning(path, *errcode),
                Meaning::Busy | Meaning::Throttled | Meaning::Disabled(_) | Meaning::Token
            ),
            Error::ApiV2 { status, code, .. } => matches!(
                new_api_meaning(*status, code),
                Meaning::Busy | Meaning::Throttled | Meaning::Token
            ),
            Error::QuotaExhausted { .. }
            | Error::Decode { .. }
            | Error::Config(_)
            | Error::Refused(_) => false,
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
            Error::Api { path, errcode, .. } => old_api_meaning(path, *errcode) == Meaning::Refused,
            Error::ApiV2 { status, code, .. } => new_api_meaning(*status, code) == Meaning::Refused,
            Error::Decode { .. } | Error::Config(_) | Error::Refused(_) => true,
            Error::Token(inner) => inner.is_permanent(),
            _ => false,
        }
    }

    /// The old-API errcode, if DingTalk sent one.
    pub fn errcode(&self) -> Option<i64> {
        match self {
            Error::Api { errcode, .. } | Error::Disabled { errcode, .. } => Some(*errcode),
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
            | Error::Disabled { request_id, .. }
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
