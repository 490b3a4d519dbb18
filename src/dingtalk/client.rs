//! [`Client`]: the request pipeline every typed call goes through.
//!
//! One attempt is: wait out an IP ban if one is running → refuse at once if DingTalk disabled
//! these requests a moment ago → get a token (single-flight) → take a QPS permit → send →
//! classify the answer. The classification (what each code means is in `error.rs`, with its
//! sources) decides between success, one token refetch, a bounded retry with back-off, holding
//! calls back, or an error; and whether the call counts toward the monthly quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::config::ClientConfig;
use super::error::{
    new_api_meaning, old_api_meaning, Error, Meaning, Scope, AUTH_ERRCODE, TOKEN_ERRCODES,
};
use super::lenient;
use super::limits::{backoff, QpsLimiter};
use super::quota::{CallCounter, QuotaStatus, QuotaTracker};
use super::token::{AccessToken, Fetched, TokenCache};
use super::Result;

/// Header that carries the token on new-API (`api.dingtalk.com/v1.0`) calls.
pub(crate) const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";
/// `status` value of DingTalk's per-IP ban answer.
const BAN_STATUS: i64 = 1111;
/// Ban length assumed when the ban answer has no usable `wait`.
const DEFAULT_BAN_WAIT: Duration = Duration::from_secs(5);
/// Ban length assumed for DingTalk's HTML ban page, which states none: the length DingTalk
/// documents for the per-IP ban (more than 10 000 calls in 20 s from one IP: five minutes,
/// <https://open.dingtalk.com/document/development/how-to-process-api-throttling-on-the-dingtalk-server>).
const HTML_BAN_WAIT: Duration = Duration::from_secs(300);
/// How long calls are held back after DingTalk said it temporarily disabled them (90001,
/// 90003–90017). DingTalk states no duration; the per-minute limits behind 90005/90006 clear
/// within a minute, so one minute, after which the next call finds out. Calling during the
/// refusal would only be refused again.
const DISABLED_PAUSE: Duration = Duration::from_secs(60);

/// The DingTalk API client. Cheap to clone; clones share the token, the limiter and the counters,
/// which is the point: one per app per process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    http: reqwest::Client,
    oapi: Url,
    api: Url,
    tokens: TokenCache,
    limiter: QpsLimiter,
    quota: QuotaTracker,
    counters: Counters,
    /// End of a per-IP ban DingTalk told us about. Shared so that every call sits it out, not just
    /// the one that saw it: the ban is on our address, and calling during it only extends it.
    /// A std mutex: read and written without awaiting.
    banned_until: Mutex<Option<Instant>>,
    /// Requests DingTalk temporarily disabled: `None` for every API, else the API's label. Same
    /// reasoning as the ban: everyone holds back, not just the call that was told.
    disabled: Mutex<HashMap<Option<String>, DisabledPause>>,
}

/// Calls held back until `until` because DingTalk answered `errcode` at `since`.
#[derive(Clone, Debug)]
struct DisabledPause {
    until: Instant,
    since: Instant,
    errcode: i64,
    errmsg: String,
}

/// Plain atomics for `/metrics`; relaxed ordering is enough for counters read at scrape time.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    throttled_retries: AtomicU64,
    busy_retries: AtomicU64,
    quota_rejections: AtomicU64,
    ip_bans: AtomicU64,
    disabled_answers: AtomicU64,
    token_rejections: AtomicU64,
}

/// A snapshot of the client's counters, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP requests sent to API endpoints (token fetches excluded, retries included).
    pub requests_sent: u64,
    /// Retries caused by QPS throttling answers (90018, 90002, `…QpsLimit…`).
    pub throttled_retries: u64,
    /// Retries caused by system faults (-1, 500, 400001, `systemError`, 5xx) or failed
    /// connections.
    pub busy_retries: u64,
    /// Calls refused because the monthly quota is used up (90020 / `ApiCountLimitForOrg`).
    pub quota_rejections: u64,
    /// Per-IP ban answers received (`status: 1111`, or DingTalk's HTML ban page).
    pub ip_bans: u64,
    /// "Requests temporarily disabled" answers received (90001, 90003–90017).
    pub disabled_answers: u64,
    /// Access-token fetches started.
    pub token_fetches: u64,
    /// Calls refused for an invalid or expired token.
    pub token_rejections: u64,
    /// Monthly calls as last read from or written to the counter (a gauge).
    pub quota_used: u64,
    /// The configured monthly quota.
    pub quota_limit: u64,
    /// Quota threshold warnings logged by this process.
    pub quota_warnings: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Which API family a request belongs to; they differ in token placement and error shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// `oapi.dingtalk.com`: token in the query, `errcode` in a 200 body.
    Old,
    /// `api.dingtalk.com/v1.0`: token in a header, HTTP status + `code` on error.
    New,
}

/// One API request, prepared once and re-sent as is on retries.
pub(crate) struct Request {
    family: Family,
    method: Method,
    /// Path template, used in logs and errors instead of the real path (which may hold ids).
    label: String,
    /// Path segments appended to the base URL (percent-encoded by `Url`).
    segments: Vec<String>,
    query: Vec<(String, String)>,
    body: Option<Bytes>,
    metered: bool,
}

impl Request {
    /// An old-API request to a fixed path such as `/topapi/v2/user/get`.
    pub(crate) fn old(method: Method, path: &str) -> Request {
        Request::new(Family::Old, method, path, split(path))
    }

    /// A new-API request. `label` is the template (`/v1.0/todo/users/{unionId}/tasks/{taskId}`),
    /// `segments` the actual path segments.
    pub(crate) fn new_api(method: Method, label: &str, segments: Vec<String>) -> Request {
        Request::new(Family::New, method, label, segments)
    }

    fn new(family: Family, method: Method, label: &str, segments: Vec<String>) -> Request {
        Request {
            family,
            method,
            label: label.to_owned(),
            segments,
            query: Vec::new(),
            body: None,
            metered: true,
        }
    }

    pub(crate) fn json<B: Serialize + ?Sized>(mut self, body: &B) -> Result<Request> {
        let bytes = serde_json::to_vec(body).map_err(|source| Error::Decode {
            path: self.label.clone(),
            source,
        })?;
        self.body = Some(Bytes::from(bytes));
        Ok(self)
    }

    pub(crate) fn query(mut self, key: &str, value: impl Into<String>) -> Request {
        self.query.push((key.to_owned(), value.into()));
        self
    }

    /// Marks a call DingTalk does not count toward the monthly quota.
    pub(crate) fn unmetered(mut self) -> Request {
        self.metered = false;
        self
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The fields of an answer that say how it went, whatever the endpoint.
#[derive(Default, Deserialize)]
struct Envelope {
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    errcode: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    errmsg: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    request_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    sub_code: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    sub_msg: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    code: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    message: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    requestid: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    status: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    wait: Option<i64>,
}

/// What an answer means for the request loop.
#[derive(Debug)]
enum Outcome {
    Success,
    InvalidToken { code: String, message: String },
    Throttled { code: String },
    Busy(Error),
    Quota(Error),
    Banned { wait: Duration },
    Disabled { scope: Scope, error: Error },
    Failed(Error),
}

impl Outcome {
    /// Whether DingTalk counts this call toward the monthly quota. Throttled calls are not
    /// counted (DingTalk's billing rule); refused-for-quota, banned and disabled calls were
    /// never served.
    /// Everything else that DingTalk answered is counted, erring toward over-counting so the
    /// warning comes early rather than late.
    fn is_counted(&self) -> bool {
        !matches!(
            self,
            Outcome::Throttled { .. }
                | Outcome::Quota(_)
                | Outcome::Banned { .. }
                | Outcome::Disabled { .. }
        )
    }
}

fn classify(
    family: Family,
    path: &str,
    status: StatusCode,
    request_id: Option<String>,
    body: &[u8],
) -> Outcome {
    let parsed = serde_json::from_slice::<Envelope>(body);
    let envelope = match parsed {
        Ok(envelope) => envelope,
        Err(_) => return classify_non_json(status, body),
    };
    if envelope.status == Some(BAN_STATUS) {
        let wait = envelope
            .wait
            .filter(|w| *w > 0)
            .map(|w| Duration::from_secs(w as u64))
            .unwrap_or(DEFAULT_BAN_WAIT);
        return Outcome::Banned { wait };
    }
    match family {
        Family::Old => classify_old(path, status, request_id, envelope, body),
        Family::New => classify_new(status, request_id, envelope),
    }
}

fn classify_old(
    path: &str,
    status: StatusCode,
    request_id: Option<String>,
    envelope: Envelope,
    body: &[u8],
) -> Outcome {
    let Some(errcode) = envelope.errcode else {
        return if status.is_success() {
            Outcome::Success
        } else {
            classify_non_json(status, body)
        };
    };
    if errcode == 0 {
        return Outcome::Success;
    }
    let errmsg = envelope.errmsg.clone().unwrap_or_default();
    let request_id = envelope.request_id.clone().or(request_id);
    let meaning = if errcode == AUTH_ERRCODE && mentions_token(&envelope) {
        Meaning::Token
    } else {
        old_api_meaning(path, errcode)
    };
    match meaning {
        Meaning::Token => Outcome::InvalidToken {
            code: errcode.to_string(),
            message: errmsg,
        },
        Meaning::Throttled => Outcome::Throttled {
            code: errcode.to_string(),
        },
        Meaning::Quota => Outcome::Quota(Error::QuotaExhausted {
            message: errmsg,
            request_id,
        }),
        Meaning::Disabled(scope) => Outcome::Disabled {
            scope,
            error: Error::Disabled {
                errcode,
                message: errmsg,
                request_id,
            },
        },
        Meaning::Busy | Meaning::Refused => {
            let busy = meaning == Meaning::Busy || status.is_server_error();
            let error = Error::Api {
                path: path.to_owned(),
                errcode,
                errmsg,
                request_id,
            };
            if busy {
                Outcome::Busy(error)
            } else {
                Outcome::Failed(error)
            }
        }
    }
}

/// Errcode 88 is a generic "authentication problem"; it is token trouble only when the
/// sub-code or a message says so.
fn mentions_token(envelope: &Envelope) -> bool {
    let sub_code_is_token = envelope
        .sub_code
        .as_deref()
        .and_then(|c| c.parse::<i64>().ok())
        .is_some_and(|c| TOKEN_ERRCODES.contains(&c));
    sub_code_is_token
        || [&envelope.errmsg, &envelope.sub_msg, &envelope.sub_code]
            .into_iter()
            .flatten()
            .any(|text| text.to_ascii_lowercase().contains("token"))
}

fn classify_new(status: StatusCode, request_id: Option<String>, envelope: Envelope) -> Outcome {
    if status.is_success() {
        return Outcome::Success;
    }
    let code = envelope.code.unwrap_or_default();
    let message = envelope.message.unwrap_or_default();
    let request_id = envelope.requestid.or(envelope.request_id).or(request_id);
    let meaning = new_api_meaning(status.as_u16(), &code);
    match meaning {
        Meaning::Token => Outcome::InvalidToken { code, message },
        Meaning::Throttled => Outcome::Throttled { code },
        Meaning::Quota => Outcome::Quota(Error::QuotaExhausted {
            message,
            request_id,
        }),
        Meaning::Busy | Meaning::Disabled(_) | Meaning::Refused => {
            let error = Error::ApiV2 {
                status: status.as_u16(),
                code,
                message,
                request_id,
            };
            if meaning == Meaning::Busy {
                Outcome::Busy(error)
            } else {
                Outcome::Failed(error)
            }
        }
    }
}

/// An answer that is not JSON at all: a gateway page, DingTalk's HTML ban page, an empty 5xx.
fn classify_non_json(status: StatusCode, body: &[u8]) -> Outcome {
    if is_ban_page(status, body) {
        return Outcome::Banned {
            wait: HTML_BAN_WAIT,
        };
    }
    if status.is_success() {
        // Let the typed parse report it; an empty 2xx body is fine for some calls.
        return Outcome::Success;
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let error = Error::ApiV2 {
        status: status.as_u16(),
        code: String::new(),
        message: snippet,
        request_id: None,
    };
    match status {
        StatusCode::UNAUTHORIZED => Outcome::InvalidToken {
            code: "401".into(),
            message: String::new(),
        },
        StatusCode::TOO_MANY_REQUESTS => Outcome::Throttled { code: "429".into() },
        s if s.is_server_error() => Outcome::Busy(error),
        _ => Outcome::Failed(error),
    }
}

/// DingTalk's per-IP ban (more than 10 000 calls in 20 s from one IP) "returns an HTML page,
/// not an errcode" (sometimes the `{"status":1111,"punish":"deny",…}` JSON instead):
/// <https://open.dingtalk.com/document/development/how-to-process-api-throttling-on-the-dingtalk-server>
/// and <https://open.dingtalk.com/document/development/call-frequency-limit>. Neither shows the
/// page, so this takes as the ban page: any answer that is not JSON and names the ban's
/// `punish` field, and any HTML page answered with 2xx, 403 or 429 (DingTalk's APIs answer
/// JSON; HTML in a 5xx is a gateway's error page, a 404 a wrong base URL).
fn is_ban_page(status: StatusCode, body: &[u8]) -> bool {
    let head = &body[..body.len().min(4096)];
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    if text.contains("punish") {
        return true;
    }
    let html = text.trim_start().starts_with('<');
    html && (status.is_success()
        || status == StatusCode::FORBIDDEN
        || status == StatusCode::TOO_MANY_REQUESTS)
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    expires_in: Option<i64>,
}

impl Client {
    /// Builds a client. Fails only on bad configuration (empty credentials, unusable URLs, zero
    /// QPS) or if the HTTP stack cannot be initialised; no request is sent.
    pub fn new(config: ClientConfig, counter: Arc<dyn CallCounter>) -> Result<Client> {
        config.validate().map_err(Error::Config)?;
        let oapi = Url::parse(&config.oapi_url).map_err(|e| Error::Config(e.to_string()))?;
        let api = Url::parse(&config.api_url).map_err(|e| Error::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(config.user_agent.clone())
            // DingTalk never redirects API calls; following one could leak the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let inner = Inner {
            tokens: TokenCache::new(config.token_refresh_margin),
            limiter: QpsLimiter::per_second(config.qps),
            quota: QuotaTracker::new(counter, config.monthly_quota, config.quota_warn_ratio),
            counters: Counters::default(),
            banned_until: Mutex::new(None),
            disabled: Mutex::new(HashMap::new()),
            http,
            oapi,
            api,
            config,
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    /// The configuration the client was built with (the secret stays redacted in `Debug`).
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The monthly quota: calls counted this month (by all replicas sharing the store), the
    /// configured limit, and what is left. Reads the counter; falls back to the last known total
    /// if the store cannot be read.
    pub async fn quota(&self) -> QuotaStatus {
        self.inner.quota.status().await
    }

    /// Counters for `/metrics`. Cheap: no I/O.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            requests_sent: c.requests.load(Ordering::Relaxed),
            throttled_retries: c.throttled_retries.load(Ordering::Relaxed),
            busy_retries: c.busy_retries.load(Ordering::Relaxed),
            quota_rejections: c.quota_rejections.load(Ordering::Relaxed),
            ip_bans: c.ip_bans.load(Ordering::Relaxed),
            disabled_answers: c.disabled_answers.load(Ordering::Relaxed),
            token_fetches: self.inner.tokens.fetches(),
            token_rejections: c.token_rejections.load(Ordering::Relaxed),
            quota_used: self.inner.quota.last_used(),
            quota_limit: self.inner.quota.limit(),
            quota_warnings: self.inner.quota.warnings(),
        }
    }

    /// The agent id work notifications need, or a configuration error.
    pub(crate) fn agent_id(&self) -> Result<i64> {
        self.inner
            .config
            .agent_id
            .ok_or_else(|| Error::Config("agent_id is not configured".into()))
    }

    /// Calls any old-API `POST` endpoint with a JSON body and returns the JSON answer, for
    /// endpoints without a typed method. Same token, limits, retries and counting as typed calls.
    pub async fn oapi_post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.execute(Request::old(Method::POST, path).json(body)?)
            .await
    }

    /// POSTs `body` to a URL DingTalk handed out that carries its own credential (a robot's
    /// session webhook): no token, not metered, but behind the same ban, QPS limiter and
    /// time-outs as every call. Only a URL on the oapi base URL's origin is called, so a
    /// caller cannot point dinghook elsewhere; `label` names the call in errors, never the URL.
    pub(crate) async fn post_credential_url(
        &self,
        label: &str,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<(StatusCode, Bytes)> {
        let parsed = Url::parse(url)
            .map_err(|_| Error::Refused(format!("{label}: the URL does not parse")))?;
        if parsed.origin() != self.inner.oapi.origin() {
            return Err(Error::Refused(format!(
                "{label}: the URL is not on DingTalk's oapi host (dingtalk.oapi_url)"
            )));
        }
        self.wait_out_ban().await?;
        self.check_disabled(label)?;
        self.inner.limiter.acquire().await;
        self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .inner
            .http
            .post(parsed)
            .json(body)
            .send()
            .await
            .map_err(|e| Error::from_reqwest(label, e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::from_reqwest(label, e))?;
        Ok((status, bytes))
    }

    /// A valid access token (fetched if needed), for callers that must talk to DingTalk outside
    /// this client. Prefer the typed methods: they also respect the limits.
    pub async fn access_token(&self) -> Result<String> {
        Ok(self.token().await?.value.to_string())
    }

    async fn token(&self) -> Result<AccessToken> {
        self.inner.tokens.get(|| self.fetch_token()).await
    }

    async fn fetch_token(&self) -> Result<Fetched> {
        const PATH: &str = "/gettoken";
        let mut url = self.inner.oapi.clone();
        push_segments(&mut url, &["gettoken".to_owned()]);
        url.query_pairs_mut()
            .append_pair("appkey", &self.inner.config.app_key)
            .append_pair("appsecret", self.inner.config.app_secret.expose());
        let response = self
            .inner
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| Error::from_reqwest(PATH, e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::from_reqwest(PATH, e))?;
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|source| {
            if status.is_success() {
                Error::Decode {
                    path: PATH.into(),
                    source,
                }
            } else {
                Error::ApiV2 {
                    status: status.as_u16(),
                    code: String::new(),
                    message: String::from_utf8_lossy(&body).chars().take(200).collect(),
                    request_id: None,
                }
            }
        })?;
        match (answer.errcode.unwrap_or(0), answer.access_token) {
            (0, Some(value)) if !value.is_empty() => {
                let secs = answer.expires_in.filter(|s| *s > 0).unwrap_or(7200) as u64;
                Ok(Fetched {
                    value,
                    expires_in: Duration::from_secs(secs),
                })
            }
            (errcode, _) => Err(Error::Api {
                path: PATH.into(),
                errcode,
                errmsg: answer
                    .errmsg
                    .unwrap_or_else(|| "no access_token in the answer".into()),
                request_id: None,
            }),
        }
    }

    /// Sleeps out a running per-IP ban, or gives up if it is longer than `max_ban_wait`.
    async fn wait_out_ban(&self) -> Result<()> {
        let until = *self
            .inner
            .banned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(until) = until else { return Ok(()) };
        let now = Instant::now();
        if until <= now {
            return Ok(());
        }
        let left = until - now;
        if left > self.inner.config.max_ban_wait {
            return Err(Error::IpBanned { wait: left });
        }
        tokio::time::sleep_until(until).await;
        Ok(())
    }

    fn note_ban(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut banned = self
            .inner
            .banned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if banned.is_none_or(|current| current < until) {
            *banned = Some(until);
        }
    }

    /// Refuses at once a call DingTalk disabled a moment ago (this API's, or every API's).
    fn check_disabled(&self, label: &str) -> Result<()> {
        let pauses = self
            .inner
            .disabled
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pauses.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let pause = [None, Some(label.to_owned())]
            .iter()
            .filter_map(|key| pauses.get(key))
            .find(|pause| pause.until > now);
        match pause {
            None => Ok(()),
            Some(pause) => Err(Error::Disabled {
                errcode: pause.errcode,
                message: format!(
                    "not sent: DingTalk answered {} ({}) {:?} ago; calls are held back for {:?} more",
                    pause.errcode,
                    pause.errmsg,
                    now - pause.since,
                    pause.until - now
                ),
                request_id: None,
            }),
        }
    }

    fn note_disabled(&self, scope: Scope, label: &str, error: &Error) {
        let Error::Disabled {
            errcode, message, ..
        } = error
        else {
            return;
        };
        let now = Instant::now();
        let key = match scope {
            Scope::AllApis => None,
            Scope::ThisApi => Some(label.to_owned()),
        };
        let mut pauses = self
            .inner
            .disabled
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pauses.retain(|_, pause| pause.until > now);
        pauses.insert(
            key,
            DisabledPause {
                until: now + DISABLED_PAUSE,
                since: now,
                errcode: *errcode,
                errmsg: message.clone(),
            },
        );
    }

    /// Sends `request` until it succeeds or fails for good, and parses the answer as `R`.
    pub(crate) async fn execute<R: DeserializeOwned>(&self, request: Request) -> Result<R> {
        let config = &self.inner.config;
        let counters = &self.inner.counters;
        let mut attempts: u32 = 0;
        let mut retries: u32 = 0;
        let mut token_refetched = false;
        loop {
            self.wait_out_ban().await?;
            self.check_disabled(&request.label)?;
            let token = self.token().await?;
            self.inner.limiter.acquire().await;
            attempts += 1;
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let sent = self.send_once(&request, &token).await;
            let (status, request_id, body) = match sent {
                Ok(answer) => answer,
                Err(err) => {
                    // A refused connection never reached DingTalk, so repeating it is safe even
                    // for a message send. Time-outs are not retried here: the request may have
                    // been processed, and only the caller knows whether repeating is harmless.
                    if err.is_connect() && retries < config.max_retries {
                        let delay =
                            backoff(retries, config.retry_base_delay, config.retry_max_delay);
                        retries += 1;
                        counters.busy_retries.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(path = %request.label, ?delay, "connection failed; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(Error::from_reqwest(&request.label, err));
                }
            };
            let outcome = classify(request.family, &request.label, status, request_id, &body);
            if request.metered && outcome.is_counted() {
                self.inner.quota.record_call().await;
            }
            match outcome {
                Outcome::Success => return parse_answer(&request.label, &body),
                Outcome::InvalidToken { code, message } => {
                    counters.token_rejections.fetch_add(1, Ordering::Relaxed);
                    self.inner.tokens.invalidate(&token);
                    if token_refetched {
                        return Err(Error::InvalidToken { code, message });
                    }
                    // Does not use up a retry: a refetch is a different remedy than waiting.
                    token_refetched = true;
                    tracing::info!(path = %request.label, %code, "access token rejected; fetching a new one");
                }
                Outcome::Throttled { code } => {
                    if retries >= config.max_retries {
                        tracing::warn!(path = %request.label, %code, attempts, "still throttled after retries");
                        return Err(Error::Throttled { code, attempts });
                    }
                    let delay = backoff(retries, config.retry_base_delay, config.retry_max_delay);
                    retries += 1;
                    counters.throttled_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %request.label, %code, ?delay, "throttled by DingTalk; backing off");
                    tokio::time::sleep(delay).await;
                }
                Outcome::Busy(error) => {
                    if retries >= config.max_retries {
                        return Err(error);
                    }
                    let delay = backoff(retries, config.retry_base_delay, config.retry_max_delay);
                    retries += 1;
                    counters.busy_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %request.label, %error, ?delay, "DingTalk busy; retrying");
                    tokio::time::sleep(delay).await;
                }
                Outcome::Quota(error) => {
                    counters.quota_rejections.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %request.label, %error, "DingTalk monthly API quota exhausted; not retrying");
                    return Err(error);
                }
                Outcome::Banned { wait } => {
                    counters.ip_bans.fetch_add(1, Ordering::Relaxed);
                    self.note_ban(wait);
                    tracing::warn!(path = %request.label, ?wait, "IP banned by DingTalk");
                    if retries >= config.max_retries || wait > config.max_ban_wait {
                        return Err(Error::IpBanned { wait });
                    }
                    retries += 1;
                    // The next turn of the loop sleeps until the ban ends.
                }
                Outcome::Disabled { scope, error } => {
                    counters.disabled_answers.fetch_add(1, Ordering::Relaxed);
                    self.note_disabled(scope, &request.label, &error);
                    tracing::warn!(path = %request.label, %error, ?scope, pause = ?DISABLED_PAUSE, "DingTalk temporarily disabled these requests; holding them back");
                    return Err(error);
                }
                Outcome::Failed(error) => return Err(error),
            }
        }
    }

    /// One HTTP exchange. Returns the reqwest error untouched so the caller can tell a failed
    /// connection (safe to repeat) from a time-out.
    async fn send_once(
        &self,
        request: &Request,
        token: &AccessToken,
    ) -> std::result::Result<(StatusCode, Option<String>, Bytes), reqwest::Error> {
        let base = match request.family {
            Family::Old => &self.inner.oapi,
            Family::New => &self.inner.api,
        };
        let mut url = base.clone();
        push_segments(&mut url, &request.segments);
        if request.family == Family::Old || !request.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            if request.family == Family::Old {
                pairs.append_pair("access_token", &token.value);
            }
            for (key, value) in &request.query {
                pairs.append_pair(key, value);
            }
        }
        let mut builder = self.inner.http.request(request.method.clone(), url);
        if request.family == Family::New {
            match HeaderValue::from_str(&token.value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    builder = builder.header(TOKEN_HEADER, value);
                }
                // A token DingTalk handed us that is not a valid header value: send none and let
                // DingTalk's InvalidAuthentication answer drive a refetch.
                Err(_) => tracing::warn!("access token is not a valid header value"),
            }
        }
        if let Some(body) = &request.body {
            builder = builder
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = builder.send().await?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-acs-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await?;
        Ok((status, request_id, body))
    }
}

fn push_segments(url: &mut Url, segments: &[String]) {
    // Base URLs are validated as http(s) in `ClientConfig::validate`, which always have a path,
    // so `path_segments_mut` cannot fail here; if it somehow did, the request would go to the
    // base URL and DingTalk would answer 404, which is reported, not hidden.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
}

/// Decodes a successful answer's body; an empty body counts as `{}`.
pub(crate) fn parse_answer<R: DeserializeOwned>(label: &str, body: &[u8]) -> Result<R> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|source| Error::Decode {
        path: label.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_GET: &str = "/topapi/v2/user/get";

    fn old(body: &str) -> Outcome {
        old_on(USER_GET, body)
    }

    fn old_on(path: &str, body: &str) -> Outcome {
        classify(Family::Old, path, StatusCode::OK, None, body.as_bytes())
    }

    fn new(status: u16, body: &str) -> Outcome {
        classify(
            Family::New,
            "/v1.0/im/sceneGroups/query",
            StatusCode::from_u16(status).unwrap(),
            None,
            body.as_bytes(),
        )
    }

    #[test]
    fn old_api_codes_are_classified() {
        assert!(matches!(
            old(r#"{"errcode":0,"errmsg":"ok"}"#),
            Outcome::Success
        ));
        for code in [40014, 42001, 40001, 33001] {
            let body = format!(r#"{{"errcode":{code},"errmsg":"x"}}"#);
            assert!(matches!(old(&body), Outcome::InvalidToken { .. }), "{code}");
        }
        assert!(matches!(
            old(
                r#"{"errcode":88,"errmsg":"鉴权异常","sub_code":"40014","sub_msg":"不合法的access_token"}"#
            ),
            Outcome::InvalidToken { .. }
        ));
        assert!(matches!(
            old(r#"{"errcode":88,"errmsg":"鉴权异常","sub_msg":"权限不足"}"#),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            old(r#"{"errcode":90018,"errmsg":"qps"}"#),
            Outcome::Throttled { .. }
        ));
        assert!(matches!(
            old(r#"{"errcode":90002,"errmsg":"qps"}"#),
            Outcome::Throttled { .. }
        ));
        assert!(matches!(
            old(r#"{"errcode":90020,"errmsg":"quota"}"#),
            Outcome::Quota(_)
        ));
        for code in [-1, 500, 400001] {
            let body = format!(r#"{{"errcode":{code},"errmsg":"x"}}"#);
            match old(&body) {
                Outcome::Busy(err) => assert!(err.is_retryable() && !err.is_permanent()),
                other => panic!("{code}: {other:?}"),
            }
        }
        // The legacy to-do API's 400001 is a refusal (same content twice in a day).
        match old_on(
            "/topapi/workrecord/add",
            r#"{"errcode":400001,"errmsg":"x"}"#,
        ) {
            Outcome::Failed(err) => assert!(err.is_permanent() && !err.is_retryable()),
            other => panic!("{other:?}"),
        }
        for (code, scope) in [
            (90001, Scope::AllApis),
            (90003, Scope::AllApis),
            (90004, Scope::AllApis),
            (90005, Scope::ThisApi),
            (90006, Scope::ThisApi),
            (90014, Scope::ThisApi),
            (90017, Scope::AllApis),
        ] {
            let body = format!(r#"{{"errcode":{code},"errmsg":"x"}}"#);
            match old(&body) {
                Outcome::Disabled { scope: s, error } => {
                    assert_eq!(s, scope, "{code}");
                    assert_eq!(error.errcode(), Some(code));
                    assert!(error.is_retryable() && !error.is_permanent(), "{code}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        assert!(matches!(
            old(r#"{"errcode":41052,"errmsg":"x"}"#),
            Outcome::Failed(_)
        ));
        match old(r#"{"errcode":60121,"errmsg":"找不到该用户","request_id":"r1"}"#) {
            Outcome::Failed(err) => {
                assert_eq!(err.errcode(), Some(60121));
                assert_eq!(err.request_id(), Some("r1"));
                assert!(err.is_permanent() && !err.is_retryable());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn new_api_codes_are_classified() {
        assert!(matches!(
            new(200, r#"{"processQueryKey":"k"}"#),
            Outcome::Success
        ));
        assert!(matches!(
            new(
                400,
                r#"{"code":"InvalidAuthentication","message":"不合法的access_token"}"#
            ),
            Outcome::InvalidToken { .. }
        ));
        assert!(matches!(new(401, ""), Outcome::InvalidToken { .. }));
        assert!(matches!(
            new(
                403,
                r#"{"code":"Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"}"#
            ),
            Outcome::Throttled { .. }
        ));
        assert!(matches!(
            new(
                403,
                r#"{"code":"Forbidden.AccessDenied.ApiCountLimitForOrg"}"#
            ),
            Outcome::Quota(_)
        ));
        assert!(matches!(new(503, "<html>busy</html>"), Outcome::Busy(_)));
        // System faults are busy whatever the HTTP status; the two the table lists as
        // refusals are not.
        for (status, code) in [
            (400, "systemError"),
            (400, "system.error"),
            (500, "system.error"),
            (400, "todo.taskCreate.systemError"),
            (503, "systemError.dingSpaceError"),
        ] {
            let body = format!(r#"{{"code":"{code}","message":"m"}}"#);
            match new(status, &body) {
                Outcome::Busy(err) => assert!(err.is_retryable() && !err.is_permanent()),
                other => panic!("{status} {code}: {other:?}"),
            }
        }
        for code in ["systemError.appNotExists", "systemError.notPermittedAccess"] {
            let body = format!(r#"{{"code":"{code}","message":"m"}}"#);
            match new(400, &body) {
                Outcome::Failed(err) => assert!(err.is_permanent()),
                other => panic!("{code}: {other:?}"),
            }
        }
        for (status, code) in [(400, "system.busy"), (429, "systemBusy")] {
            let body = format!(r#"{{"code":"{code}","message":"m"}}"#);
            assert!(
                matches!(new(status, &body), Outcome::Throttled { .. }),
                "{code}"
            );
        }
        // `sceneGroup/create`'s refusals (its page's codes, DingTalk's spelling).
        for code in [
            "parameter.invalid",
            "member.exceed",
            "member.notFound",
            "groupTemplate.notFound",
            "groupTemplate.permessionDenied.orgNotInGrayList",
            "groupTemplate.permessionDenied.appNotInstalled",
            "groupTemplate.permessionDenied.orgNotConsistent",
            "permession.checkFailed",
        ] {
            let body = format!(r#"{{"code":"{code}","message":"m"}}"#);
            match new(400, &body) {
                Outcome::Failed(err) => assert!(err.is_permanent() && !err.is_retryable()),
                other => panic!("{code}: {other:?}"),
            }
        }
        match new(
            400,
            r#"{"code":"invalid.openConversationId","message":"m","requestid":"r2"}"#,
        ) {
            Outcome::Failed(err) => {
                assert_eq!(err.code(), Some("invalid.openConversationId"));
                assert_eq!(err.request_id(), Some("r2"));
                assert!(err.is_permanent());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ban_body_is_recognised_on_either_family() {
        let body = r#"{"status":1111,"wait":7,"punish":"deny"}"#;
        for family in [Family::Old, Family::New] {
            match classify(family, "/x", StatusCode::FORBIDDEN, None, body.as_bytes()) {
                Outcome::Banned { wait } => assert_eq!(wait, Duration::from_secs(7)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn html_ban_page_is_recognised() {
        let page =
            "<!DOCTYPE html><html><head><title>访问被拒绝</title></head><body>deny</body></html>";
        for status in [200, 403, 429] {
            let status = StatusCode::from_u16(status).unwrap();
            for family in [Family::Old, Family::New] {
                match classify(family, "/x", status, None, page.as_bytes()) {
                    Outcome::Banned { wait } => assert_eq!(wait, HTML_BAN_WAIT),
                    other => panic!("{status}: {other:?}"),
                }
            }
        }
        // The ban's own field names it whatever the status and shape.
        let text = "status=1111 punish=deny wait=5";
        assert!(matches!(
            classify(
                Family::Old,
                "/x",
                StatusCode::FORBIDDEN,
                None,
                text.as_bytes()
            ),
            Outcome::Banned { .. }
        ));
        // A gateway's error page is a fault, a 404 page a wrong URL, an empty 200 a success.
        let gateway = "<html><body>502 Bad Gateway</body></html>";
        assert!(matches!(
            classify(
                Family::Old,
                "/x",
                StatusCode::BAD_GATEWAY,
                None,
                gateway.as_bytes()
            ),
            Outcome::Busy(_)
        ));
        assert!(matches!(
            classify(
                Family::Old,
                "/x",
                StatusCode::NOT_FOUND,
                None,
                page.as_bytes()
            ),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            classify(Family::Old, "/x", StatusCode::OK, None, b""),
            Outcome::Success
        ));
    }

    #[test]
    fn counting_rules() {
        assert!(old(r#"{"errcode":0}"#).is_counted());
        assert!(old(r#"{"errcode":60121}"#).is_counted());
        assert!(!old(r#"{"errcode":90018}"#).is_counted());
        assert!(!old(r#"{"errcode":90020}"#).is_counted());
        assert!(!old(r#"{"errcode":90001}"#).is_counted());
        assert!(old(r#"{"errcode":500}"#).is_counted());
    }
}
