//! Stream mode: dinghook opens an outbound WebSocket to DingTalk and events arrive over it (no
//! public URL). The protocol is the one the official SDKs speak (`docs/stream-mode.md` in the
//! shared docs): `POST {api_url}/v1.0/gateway/connections/open` with the app's AppKey and
//! AppSecret gives an endpoint and a one-shot ticket; the WebSocket carries `SYSTEM`, `EVENT` and
//! `CALLBACK` frames, each answered by an ack on the same socket.
//!
//! What dinghook adds to the SDKs:
//! - An EVENT becomes the event an HTTP push of it makes (type, corp and id from the frame's
//!   headers merged into its `data`), so the de-duplication key is the push's: an event that
//!   comes by push and by Stream, or twice by Stream, or to two replicas, is stored once.
//! - `SUCCESS` is sent only after the store committed the event; a store that fails or is too
//!   slow (`stream.store_timeout`) gets `LATER`, and DingTalk delivers it again.
//! - At most `stream.concurrency` frames are handled at once; at the bound the socket is not
//!   read (back-pressure onto DingTalk's window), nothing is buffered without limit.
//! - `disconnect` opens the next connection first, then the old one finishes its acks and
//!   closes: no gap. Drops reconnect at once, then with capped exponential back-off and jitter;
//!   a watchdog reconnects a connection on which nothing (frame or pong) arrived for
//!   `stream.watchdog`; WebSocket pings every `stream.ping_interval`.
//! - On stop (SIGTERM, a reload that changes the app's stream settings) reading stops, the
//!   commits under way finish and are acknowledged, then the socket closes.
//!
//! Robot messages (CALLBACK topic `/v1.0/im/bot/messages/get`, with `stream.robot`) are stored
//! as events of type `robot_message` keyed by their `msgId`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::event::Envelope;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Inserted, NewEvent, Source, Store};
use crate::time::{duration_str, now_millis};

/// Where a connection is opened, under the app's `dingtalk.api_url`.
pub const OPEN_PATH: &str = "/v1.0/gateway/connections/open";
/// The CALLBACK topic of robot messages.
pub const ROBOT_TOPIC: &str = "/v1.0/im/bot/messages/get";
/// The event type robot messages are stored as.
pub const ROBOT_EVENT_TYPE: &str = crate::event::ROBOT_MESSAGE;
/// The key a frame's `data` is kept under when it is not a JSON object.
pub const RAW_DATA_KEY: &str = "streamData";

/// The WebSocket library's own bound on a message: beyond it the connection ends. Frames
/// between `stream.max_frame` and this are read, refused and acknowledged.
const SOCKET_MESSAGE_LIMIT: usize = 64 << 20;
/// How long a closing connection waits for its commits and the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// A connection that lasted this long without frames still counts as healthy (back-off reset).
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// The soonest a `LATER` is sent after its frame arrived. A store that is down fails at once,
/// and DingTalk may deliver again at once: without a floor the frames in hand would ask the
/// store (and log) thousands of times a second. With it, at most `stream.concurrency` frames
/// per pause; far below any ack time-out.
const LATER_FLOOR: Duration = Duration::from_millis(250);

/// `[stream]`: Stream mode. `enabled` turns it on for the top-level (`default`) app; an
/// `[apps.NAME]` table says `stream = true` (or a `[apps.NAME.stream]` table), and takes the
/// other knobs from here unless it sets them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Receive over Stream mode (needs the app's app_key and app_secret).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// Also subscribe to robot messages (CALLBACK `/v1.0/im/bot/messages/get`).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub robot: bool,
    /// Frames handled at once per app; at the bound the socket is not read.
    #[serde(deserialize_with = "crate::setting::number")]
    pub concurrency: usize,
    /// First reconnection delay after a failure; doubled each failure in a row.
    #[serde(with = "duration_str")]
    pub backoff_base: Duration,
    /// The longest reconnection delay.
    #[serde(with = "duration_str")]
    pub backoff_max: Duration,
    /// Each delay is shortened by up to this fraction at random, so replicas spread out.
    #[serde(deserialize_with = "crate::setting::number")]
    pub backoff_jitter: f64,
    /// Reconnect when nothing (frame or pong) arrived for this long.
    #[serde(with = "duration_str")]
    pub watchdog: Duration,
    /// A WebSocket ping this often.
    #[serde(with = "duration_str")]
    pub ping_interval: Duration,
    /// Longest wait for the store's commit of one frame; then the frame is answered `LATER`.
    #[serde(with = "duration_str")]
    pub store_timeout: Duration,
    /// Longest wait for `connections/open` and for the WebSocket handshake.
    #[serde(with = "duration_str")]
    pub open_timeout: Duration,
    /// Frames larger than this (bytes) are refused: logged, counted and acknowledged.
    #[serde(deserialize_with = "crate::setting::number")]
    pub max_frame: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            enabled: false,
            robot: false,
            concurrency: 64,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_jitter: 0.2,
            watchdog: Duration::from_secs(90),
            ping_interval: Duration::from_secs(30),
            store_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(10),
            max_frame: 1 << 20,
        }
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "DingTalk refused the app's credentials (HTTP {status}): check app_key and app_secret"
    )]
    Credentials { status: u16 },
    #[error("connections/open answered HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("connections/open failed: {0}")]
    Http(String),
    #[error("connections/open answered without an endpoint and a ticket: {0}")]
    BadAnswer(String),
    #[error("the WebSocket to {endpoint} failed: {message}")]
    Connect { endpoint: String, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl OpenError {
    /// The `reason` label of the reconnect this failure causes.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::Credentials { .. } => "auth_failed",
            OpenError::Refused { .. } | OpenError::Http(_) | OpenError::BadAnswer(_) => {
                "open_failed"
            }
            OpenError::Connect { .. } => "connect_failed",
            OpenError::Timeout(_) => "open_timeout",
        }
    }
}

/// A frame that could not be read as one (counted by reason, never a crash).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    #[error("the frame is not JSON: {0}")]
    NotJson(String),
    #[error("the frame is JSON but not an object")]
    NotObject,
    #[error("the frame has no headers object")]
    NoHeaders,
    #[error("the frame has no headers.messageId")]
    NoMessageId,
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("the frame has {size} bytes, more than stream.max_frame ({limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("the frame is binary")]
    Binary,
}

impl BadFrame {
    pub fn code(&self) -> &'static str {
        match self {
            BadFrame::NotJson(_) => "not_json",
            BadFrame::NotObject => "not_object",
            BadFrame::NoHeaders => "no_headers",
            BadFrame::NoMessageId => "no_message_id",
            BadFrame::UnknownType(_) => "unknown_type",
            BadFrame::TooLarge { .. } => "too_large",
            BadFrame::Binary => "binary",
        }
    }
}

/// A frame from DingTalk, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Every header, unknown ones kept (values are strings on the wire).
    pub headers: Map<String, Value>,
    pub message_id: String,
    /// `data` as sent (normally a JSON string).
    pub data: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    System,
    Event,
    Callback,
}

impl Frame {
    /// Reads a text frame. A frame that is not JSON, not an object, has no headers or no
    /// `messageId`, or an unknown `type` is a [`BadFrame`].
    pub fn parse(text: &str) -> Result<Frame, BadFrame> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| BadFrame::NotJson(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(BadFrame::NotObject);
        };
        let Some(Value::Object(headers)) = object.remove("headers") else {
            return Err(BadFrame::NoHeaders);
        };
        let message_id = match headers.get("messageId") {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            _ => return Err(BadFrame::NoMessageId),
        };
        let kind = match object.get("type").and_then(Value::as_str) {
            Some("SYSTEM") => FrameKind::System,
            Some("EVENT") => FrameKind::Event,
            Some("CALLBACK") => FrameKind::Callback,
            other => {
                return Err(BadFrame::UnknownType(
                    other.unwrap_or("(none)").chars().take(64).collect(),
                ))
            }
        };
        Ok(Frame {
            kind,
            headers,
            message_id,
            data: object.remove("data"),
        })
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).and_then(Value::as_str)
    }

    pub fn topic(&self) -> &str {
        self.header("topic").unwrap_or("")
    }

    /// `data` as a JSON object: a JSON string holding an object (the protocol), or an object
    /// itself (tolerated). `Err` holds what it was instead.
    fn data_object(&self) -> Result<Map<String, Value>, Value> {
        match &self.data {
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(object)) => Ok(object),
                Ok(other) => Err(other),
                Err(_) => Err(Value::String(text.clone())),
            },
            Some(Value::Object(object)) => Ok(object.clone()),
            Some(other) => Err(other.clone()),
            None => Err(Value::Null),
        }
    }
}

/// The payload an HTTP push of this EVENT carries: the fields of `data`, then `EventType`,
/// `CorpId`, `eventId` and `EventTime` from the headers (the headers win over fields of those
/// names in any case). `data` that is not an object is kept under [`RAW_DATA_KEY`]; the bool
/// says whether it was an object.
pub fn event_payload(frame: &Frame) -> (Map<String, Value>, bool) {
    let (mut object, ok) = match frame.data_object() {
        Ok(object) => (object, true),
        Err(Value::Null) => (Map::new(), false),
        Err(other) => {
            let mut object = Map::new();
            object.insert(RAW_DATA_KEY.into(), other);
            (object, false)
        }
    };
    let fields: [(&str, &str); 4] = [
        ("EventType", "eventType"),
        ("CorpId", "eventCorpId"),
        ("eventId", "eventId"),
        ("EventTime", "eventBornTime"),
    ];
    for (field, header) in fields {
        let Some(value) = frame.header(header).filter(|v| !v.is_empty()) else {
            continue;
        };
        object.retain(|k, _| !k.eq_ignore_ascii_case(field));
        let value = match (field, value.parse::<i64>()) {
            ("EventTime", Ok(ms)) => json!(ms),
            _ => json!(value),
        };
        object.insert(field.to_owned(), value);
    }
    (object, ok)
}

/// The [`NewEvent`] of an EVENT frame: the push's payload and de-duplication key.
pub fn event_from_frame(frame: &Frame, now_ms: i64) -> (NewEvent, bool) {
    let (object, ok) = event_payload(frame);
    let payload = Value::Object(object).to_string();
    let event = match Envelope::parse(payload.as_bytes()) {
        Ok((envelope, _)) => NewEvent::from_envelope(envelope, payload, Source::Stream, now_ms),
        // An object serialized a moment ago parses again; this keeps the path free of panics.
        Err(_) => NewEvent::from_envelope(
            Envelope {
                event_type: "unknown".into(),
                corp_id: None,
                event_id: None,
                biz_id: None,
                event_time: None,
            },
            payload,
            Source::Stream,
            now_ms,
        ),
    };
    (event, ok)
}

/// The [`NewEvent`] of a robot message (CALLBACK on [`ROBOT_TOPIC`]): type `robot_message`,
/// keyed `robot:<msgId>`, the message JSON as payload, exactly as the robot's HTTP endpoint
/// stores it ([`super::robot::new_event`]). `None` when `data` is not an object.
pub fn robot_event(frame: &Frame, now_ms: i64) -> Option<NewEvent> {
    let object = frame.data_object().ok()?;
    Some(super::robot::new_event(object, Source::Stream, now_ms))
}

/// An ack: `code`, the frame's messageId, `data` (a JSON string).
pub fn ack(message_id: &str, code: u16, message: &str, data: &str) -> String {
    json!({
        "code": code,
        "headers": {"messageId": message_id, "contentType": "application/json"},
        "message": message,
        "data": data,
    })
    .to_string()
}

fn event_ack(message_id: &str, stored: bool, message: &str) -> String {
    if stored {
        ack(
            message_id,
            200,
            "OK",
            &json!({"status": "SUCCESS", "message": message}).to_string(),
        )
    } else {
        ack(
            message_id,
            500,
            message,
            &json!({"status": "LATER", "message": message}).to_string(),
        )
    }
}

/// The delay before reconnection attempt `failures` (1 for the first failure in a row): base ·
/// 2^(failures−1), capped, shortened by up to `jitter` at random. Zero failures: no delay.
pub fn backoff(config: &StreamConfig, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
    let delay = config
        .backoff_base
        .saturating_mul(factor)
        .min(config.backoff_max);
    let jitter = config.backoff_jitter.clamp(0.0, 1.0);
    let cut = if jitter > 0.0 {
        rand::random::<f64>() * jitter
    } else {
        0.0
    };
    delay.mul_f64(1.0 - cut)
}

/// One app's Stream client: see the module documentation.
pub struct StreamSource {
    app: Arc<str>,
    config: StreamConfig,
    client_id: String,
    client_secret: Secret,
    api_url: String,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    routing: crate::routes::Routing,
    http: reqwest::Client,
}

/// What a connection task reports when it ends.
struct Ended {
    reason: &'static str,
    detail: String,
    frames: u64,
    lasted: Duration,
}

impl StreamSource {
    /// The client of app `app` with credentials `client_id`/`client_secret` (its AppKey and
    /// AppSecret) against `api_url`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: &str,
        config: StreamConfig,
        client_id: &str,
        client_secret: Secret,
        api_url: &str,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.open_timeout)
            .connect_timeout(config.open_timeout)
            .build()
            .unwrap_or_default();
        StreamSource {
            app: app.into(),
            config,
            client_id: client_id.to_owned(),
            client_secret,
            api_url: api_url.trim_end_matches('/').to_owned(),
            store,
            metrics,
            wake,
            routing: crate::routes::Routing::default(),
            http,
        }
    }

    /// Stored events go to the routes `routing` names, like pushed ones.
    pub fn with_routing(mut self, routing: crate::routes::Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Runs until `stop` turns true: connects, reconnects, and on stop closes cleanly.
    pub fn start(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let app = Arc::clone(&self.app);
        tokio::spawn(async move {
            let this = Arc::new(self);
            this.supervise(stop).await;
            tracing::info!(app = %app, "stream client stopped");
        })
    }

    async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let app = Arc::clone(&self.app);
        tracing::info!(app = %app, robot = self.config.robot, "stream client started");
        let mut failures: u32 = 0;
        // Connections told to go (`disconnect`), each with its "the next one is up" signal.
        let mut draining: Vec<(JoinHandle<Ended>, watch::Sender<bool>)> = Vec::new();
        loop {
            if *stop.borrow() {
                break;
            }
            draining.retain(|(t, _)| !t.is_finished());
            self.metrics.stream_state(&app, "connecting");
            let opened = match tokio::time::timeout(self.config.open_timeout * 2, self.open()).await
            {
                Ok(result) => result,
                Err(_) => Err(OpenError::Timeout(self.config.open_timeout * 2)),
            };
            let socket = match opened {
                Ok(socket) => socket,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(&self.config, failures);
                    if matches!(e, OpenError::Credentials { .. }) {
                        tracing::error!(app = %app, error = %e, retry_in = ?delay, "stream connection refused");
                    } else {
                        tracing::warn!(app = %app, error = %e, retry_in = ?delay, "stream connection failed");
                    }
                    self.metrics
                        .stream_reconnect(&app, e.reason(), &e.to_string());
                    self.metrics.stream_state(&app, "backoff");
                    if sleep_or_stop(delay, &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            self.metrics.stream_state(&app, "connected");
            tracing::info!(app = %app, "stream connected");
            // The connections told to go may close now that this one is up.
            for (_, replaced) in &draining {
                let _ = replaced.send(true);
            }
            let (disconnect_tx, mut disconnect_rx) = oneshot::channel::<()>();
            let (replaced_tx, replaced_rx) = watch::channel(false);
            let mut connection = tokio::spawn(Arc::clone(&self).run_connection(
                socket,
                stop.clone(),
                disconnect_tx,
                replaced_rx,
            ));
            tokio::select! {
                Ok(()) = &mut disconnect_rx => {
                    // DingTalk asked us to move: the next connection now, the old one finishes
                    // its acks meanwhile.
                    tracing::info!(app = %app, "stream disconnect asked: opening the next connection");
                    self.metrics.stream_reconnect(&app, "disconnect", "DingTalk sent disconnect");
                    draining.push((connection, replaced_tx));
                    failures = 0;
                }
                ended = &mut connection => {
                    let ended = ended.unwrap_or_else(|e| Ended {
                        reason: "task_failed",
                        detail: e.to_string(),
                        frames: 0,
                        lasted: Duration::ZERO,
                    });
                    if ended.reason == "stopped" {
                        break;
                    }
                    if ended.frames > 0 || ended.lasted >= STABLE_AFTER {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    let delay = backoff(&self.config, failures);
                    tracing::warn!(
                        app = %app,
                        reason = ended.reason,
                        detail = %ended.detail,
                        frames = ended.frames,
                        retry_in = ?delay,
                        "stream connection ended"
                    );
                    self.metrics.stream_reconnect(&app, ended.reason, &ended.detail);
                    if !delay.is_zero() {
                        self.metrics.stream_state(&app, "backoff");
                    }
                    if sleep_or_stop(delay, &mut stop).await {
                        break;
                    }
                }
            }
        }
        self.metrics.stream_state(&app, "stopping");
        for (task, _) in draining {
            let _ = task.await;
        }
        self.metrics.stream_state(&app, "stopped");
    }

    /// `connections/open`, then the WebSocket with the ticket.
    async fn open(&self) -> Result<Socket, OpenError> {
        let mut subscriptions = vec![json!({"type": "EVENT", "topic": "*"})];
        if self.config.robot {
            subscriptions.push(json!({"type": "CALLBACK", "topic": ROBOT_TOPIC}));
        }
        let body = json!({
            "clientId": self.client_id,
            "clientSecret": self.client_secret.expose(),
            "subscriptions": subscriptions,
            "ua": concat!("dinghook/", env!("CARGO_PKG_VERSION")),
        });
        let response = self
            .http
            .post(format!("{}{OPEN_PATH}", self.api_url))
            .header("Accept", "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| OpenError::Http(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| OpenError::Http(e.without_url().to_string()))?;
        if status == 401 || status == 403 {
            return Err(OpenError::Credentials { status });
        }
        if status != 200 {
            return Err(OpenError::Refused {
                status,
                body: text.chars().take(200).collect(),
            });
        }
        #[derive(Deserialize)]
        struct Opened {
            endpoint: Option<String>,
            ticket: Option<String>,
        }
        let opened: Opened = serde_json::from_str(&text)
            .map_err(|e| OpenError::BadAnswer(format!("not JSON: {e}")))?;
        let (Some(endpoint), Some(ticket)) = (opened.endpoint, opened.ticket) else {
            return Err(OpenError::BadAnswer("missing endpoint or ticket".into()));
        };
        if endpoint.is_empty() || ticket.is_empty() {
            return Err(OpenError::BadAnswer("empty endpoint or ticket".into()));
        }
        let ticket: String = form_urlencoded::byte_serialize(ticket.as_bytes()).collect();
        let separator = if endpoint.contains('?') { '&' } else { '?' };
        let url = format!("{endpoint}{separator}ticket={ticket}");
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(SOCKET_MESSAGE_LIMIT))
            .max_frame_size(Some(SOCKET_MESSAGE_LIMIT));
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true);
        match tokio::time::timeout(self.config.open_timeout, connect).await {
            Ok(Ok((socket, _))) => Ok(socket),
            // The error may hold the URL, which holds the ticket: only its kind is shown.
            Ok(Err(e)) => Err(OpenError::Connect {
                endpoint: endpoint.clone(),
                message: describe_ws_error(&e),
            }),
            Err(_) => Err(OpenError::Timeout(self.config.open_timeout)),
        }
    }

    /// One connection: reads frames (at most `concurrency` in hand), answers them, pings, and
    /// ends on close, error, watchdog or stop.
    async fn run_connection(
        self: Arc<Self>,
        socket: Socket,
        mut stop: watch::Receiver<bool>,
        disconnect: oneshot::Sender<()>,
        mut replaced: watch::Receiver<bool>,
    ) -> Ended {
        let started = Instant::now();
        let app = Arc::clone(&self.app);
        let (sink, mut reader) = socket.split();
        let concurrency = self.config.concurrency.max(1);
        let permits = Arc::new(Semaphore::new(concurrency));
        let (out, rx) = mpsc::channel::<Message>(concurrency * 2 + 16);
        let mut writer = tokio::spawn(write_loop(sink, rx, self.config.ping_interval));
        let mut writer_done = false;
        let mut disconnect = Some(disconnect);
        let mut frames = 0u64;
        let mut draining = false;
        let watchdog = self.config.watchdog;
        let mut last_inbound = tokio::time::Instant::now();
        let (reason, detail): (&'static str, String) = loop {
            // Back-pressure: a permit first, then a frame.
            let waiting = tokio::time::Instant::now();
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break ("internal", "permits closed".into()),
                },
                _ = stop.wait_for(|s| *s) => break ("stopped", String::new()),
            };
            // Time spent waiting for a permit is the store's, not DingTalk's silence.
            last_inbound += waiting.elapsed();
            // After `disconnect`: once the next connection is up and every ack is out, close.
            let all_done = async {
                if draining {
                    let _ = replaced.wait_for(|r| *r).await;
                    let _ = permits.acquire_many(concurrency as u32 - 1).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let message = tokio::select! {
                message = reader.next() => message,
                _ = tokio::time::sleep_until(last_inbound + watchdog) => {
                    break ("watchdog", format!("nothing received for {watchdog:?}"));
                }
                _ = stop.wait_for(|s| *s) => break ("stopped", String::new()),
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    break ("write_error", "the socket could not be written".into());
                }
                () = all_done => break ("drained", "acknowledged everything after disconnect".into()),
            };
            last_inbound = tokio::time::Instant::now();
            let message = match message {
                None => break ("closed", "the socket ended".into()),
                Some(Err(e)) => break ("read_error", describe_ws_error(&e)),
                Some(Ok(message)) => message,
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Binary(_) => {
                    self.bad_frame(&BadFrame::Binary, None, &out).await;
                    continue;
                }
                Message::Close(frame) => {
                    let detail = frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default();
                    break ("closed_by_server", detail);
                }
                // Pings are answered by the library; a pong (or ping) is life.
                _ => continue,
            };
            frames += 1;
            self.metrics.stream_frame_seen(&app);
            if text.len() > self.config.max_frame {
                let bad = BadFrame::TooLarge {
                    size: text.len(),
                    limit: self.config.max_frame,
                };
                // Its messageId, to answer it so it is not sent forever.
                let id = Frame::parse(text.as_str()).ok().map(|f| f.message_id);
                self.bad_frame(&bad, id.as_deref(), &out).await;
                continue;
            }
            let frame = match Frame::parse(text.as_str()) {
                Ok(frame) => frame,
                Err(bad) => {
                    let id = serde_json::from_str::<Value>(text.as_str())
                        .ok()
                        .and_then(|v| v.pointer("/headers/messageId")?.as_str().map(str::to_owned));
                    self.bad_frame(&bad, id.as_deref(), &out).await;
                    continue;
                }
            };
            match frame.kind {
                FrameKind::System => {
                    let topic = frame.topic().to_owned();
                    match topic.as_str() {
                        "ping" => {
                            self.metrics.stream_frame(&app, "system_ping");
                            let data = match &frame.data {
                                Some(Value::String(s)) => s.clone(),
                                Some(other) => other.to_string(),
                                None => String::new(),
                            };
                            let reply = ack(&frame.message_id, 200, "OK", &data);
                            let _ = out.send(Message::text(reply)).await;
                            self.metrics.stream_ack(&app, "pong", None);
                        }
                        "disconnect" => {
                            self.metrics.stream_frame(&app, "system_disconnect");
                            draining = true;
                            if let Some(tell) = disconnect.take() {
                                let _ = tell.send(());
                            }
                        }
                        other => {
                            self.metrics.stream_frame(&app, "system_other");
                            tracing::info!(app = %app, topic = %other.chars().take(64).collect::<String>(), "unknown SYSTEM frame acknowledged");
                            let data = match &frame.data {
                                Some(Value::String(s)) => s.clone(),
                                _ => "{}".into(),
                            };
                            let reply = ack(&frame.message_id, 200, "OK", &data);
                            let _ = out.send(Message::text(reply)).await;
                            self.metrics.stream_ack(&app, "system", None);
                        }
                    }
                    drop(permit);
                }
                FrameKind::Event => {
                    self.metrics.stream_frame(&app, "event");
                    let this = Arc::clone(&self);
                    let out = out.clone();
                    tokio::spawn(async move {
                        this.handle_event(frame, &out).await;
                        drop(permit);
                    });
                }
                FrameKind::Callback if frame.topic() == ROBOT_TOPIC => {
                    self.metrics.stream_frame(&app, "callback_robot");
                    let this = Arc::clone(&self);
                    let out = out.clone();
                    tokio::spawn(async move {
                        this.handle_robot(frame, &out).await;
                        drop(permit);
                    });
                }
                FrameKind::Callback => {
                    self.metrics.stream_frame(&app, "callback_other");
                    tracing::info!(app = %app, topic = %frame.topic().chars().take(64).collect::<String>(), "CALLBACK of a topic without a handler");
                    let reply = ack(
                        &frame.message_id,
                        404,
                        "no handler for this topic",
                        "{\"response\":null}",
                    );
                    let _ = out.send(Message::text(reply)).await;
                    self.metrics.stream_ack(&app, "callback_unhandled", None);
                    drop(permit);
                }
            }
        };
        // Finish: no more reading; the commits under way end and are acknowledged (on a live
        // socket), then the socket closes.
        let _ = tokio::time::timeout(
            self.config.store_timeout + CLOSE_WAIT,
            permits.acquire_many(concurrency as u32),
        )
        .await;
        drop(out);
        if !writer_done && tokio::time::timeout(CLOSE_WAIT, &mut writer).await.is_err() {
            writer.abort();
        }
        Ended {
            reason,
            detail,
            frames,
            lasted: started.elapsed(),
        }
    }

    async fn bad_frame(
        &self,
        bad: &BadFrame,
        message_id: Option<&str>,
        out: &mpsc::Sender<Message>,
    ) {
        self.metrics.stream_frame(&self.app, "bad");
        self.metrics.stream_bad_frame(&self.app, bad.code());
        tracing::warn!(app = %self.app, code = bad.code(), error = %bad, answered = message_id.is_some(), "bad stream frame");
        if let Some(id) = message_id {
            // Answered SUCCESS: it can never be stored, and anything else is sent again forever.
            let reply = ack(
                id,
                200,
                "OK",
                &json!({"status": "SUCCESS", "message": format!("discarded: {bad}")}).to_string(),
            );
            let _ = out.send(Message::text(reply)).await;
            self.metrics.stream_ack(&self.app, "discarded", None);
        }
    }

    /// Stores an EVENT, then answers `SUCCESS`; `LATER` when the store fails or is too slow.
    async fn handle_event(&self, frame: Frame, out: &mpsc::Sender<Message>) {
        let started = Instant::now();
        let (mut event, data_ok) = event_from_frame(&frame, now_millis());
        if !data_ok {
            self.metrics.stream_bad_frame(&self.app, "bad_data");
            tracing::warn!(app = %self.app, message_id = %frame.message_id, "EVENT frame whose data is not a JSON object: stored with the raw data under streamData");
        }
        let stored = self.store(&mut event).await;
        if stored.is_none() {
            tokio::time::sleep_until((started + LATER_FLOOR).into()).await;
        }
        let reply = event_ack(
            &frame.message_id,
            stored.is_some(),
            if stored.is_some() {
                "success"
            } else {
                "not stored; send it again later"
            },
        );
        let status = if stored.is_some() { "SUCCESS" } else { "LATER" };
        if out.send(Message::text(reply)).await.is_ok() {
            self.metrics
                .stream_ack(&self.app, status, Some(started.elapsed().as_secs_f64()));
        }
    }

    async fn handle_robot(&self, frame: Frame, out: &mpsc::Sender<Message>) {
        let started = Instant::now();
        let Some(mut event) = robot_event(&frame, now_millis()) else {
            self.metrics.stream_bad_frame(&self.app, "bad_data");
            tracing::warn!(app = %self.app, message_id = %frame.message_id, "robot message whose data is not a JSON object: not stored");
            let reply = ack(
                &frame.message_id,
                400,
                "data is not a JSON object",
                "{\"response\":null}",
            );
            let _ = out.send(Message::text(reply)).await;
            self.metrics.stream_ack(&self.app, "callback_error", None);
            return;
        };
        let (code, message, status) = match self.store(&mut event).await {
            Some(_) => (200, "OK", "callback"),
            None => (500, "not stored", "callback_error"),
        };
        let reply = ack(&frame.message_id, code, message, "{\"response\":null}");
        if out.send(Message::text(reply)).await.is_ok() {
            self.metrics
                .stream_ack(&self.app, status, Some(started.elapsed().as_secs_f64()));
        }
    }

    /// Routes and stores `event`; `Some` once the store committed it (new or duplicate).
    async fn store(&self, event: &mut NewEvent) -> Option<Inserted> {
        event.app = self.app.to_string();
        self.routing.route(event);
        let routes = event.routes.clone();
        let event_type = event.event_type.clone();
        match tokio::time::timeout(self.config.store_timeout, self.store.insert(event.clone()))
            .await
        {
            Ok(Ok(inserted @ Inserted::Stored { id })) => {
                self.wake.notify_one();
                self.routing.stored(&routes);
                tracing::debug!(app = %self.app, id, %event_type, "stream event stored");
                Some(inserted)
            }
            Ok(Ok(inserted @ Inserted::Duplicate { id })) => {
                self.metrics.stream_redelivery(&self.app);
                tracing::debug!(app = %self.app, id, %event_type, "stream redelivery acknowledged");
                Some(inserted)
            }
            Ok(Err(e)) => {
                tracing::error!(app = %self.app, error = %e, %event_type, "stream event not stored; answered LATER");
                None
            }
            Err(_) => {
                tracing::error!(app = %self.app, timeout = ?self.config.store_timeout, %event_type, "stream event not stored in time; answered LATER");
                None
            }
        }
    }
}

/// The Stream clients of all apps, each with its own stop, so a reload replaces one without
/// touching the others (the application holds one of these; see `src/app.rs`).
#[derive(Default)]
pub struct StreamClients {
    /// Built before the application runs, started with it.
    waiting: std::collections::HashMap<String, StreamSource>,
    running: std::collections::HashMap<String, (watch::Sender<bool>, JoinHandle<()>)>,
    /// Stopped by a reload; joined at shutdown (they finish their commits and acks).
    retired: Vec<JoinHandle<()>>,
    started: bool,
    stopped: bool,
}

impl StreamClients {
    /// Puts `client` in the place of `app`'s (stopping the one running), or just stops it.
    pub fn replace(&mut self, app: &str, client: Option<StreamSource>) {
        self.waiting.remove(app);
        if let Some((stop, task)) = self.running.remove(app) {
            let _ = stop.send(true);
            self.retired.retain(|t| !t.is_finished());
            self.retired.push(task);
        }
        match client {
            Some(client) if self.started && !self.stopped => self.launch(app, client),
            Some(client) if !self.stopped => {
                self.waiting.insert(app.to_owned(), client);
            }
            _ => {}
        }
    }

    fn launch(&mut self, app: &str, client: StreamSource) {
        let (stop, stopping) = watch::channel(false);
        self.running
            .insert(app.to_owned(), (stop, client.start(stopping)));
    }

    /// Starts the clients built so far; later ones start as they are added.
    pub fn start_all(&mut self) {
        self.started = true;
        for (app, client) in std::mem::take(&mut self.waiting) {
            self.launch(&app, client);
        }
    }

    /// Stops every client; returns their tasks, to join before the store closes.
    pub fn stop_all(&mut self) -> Vec<JoinHandle<()>> {
        self.stopped = true;
        self.waiting.clear();
        let mut tasks = std::mem::take(&mut self.retired);
        for (_, (stop, task)) in self.running.drain() {
            let _ = stop.send(true);
            tasks.push(task);
        }
        tasks
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket error without anything the request held (the URL holds the ticket).
fn describe_ws_error(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(response) => format!("handshake answered HTTP {}", response.status()),
        Error::Url(_) => "the endpoint is not a WebSocket URL".into(),
        Error::Io(io) => format!("I/O: {}", io.kind()),
        Error::Tls(_) => "TLS failed".into(),
        Error::Capacity(c) => format!("too large: {c}"),
        Error::Protocol(p) => format!("protocol: {p}"),
        Error::ConnectionClosed | Error::AlreadyClosed => "closed".into(),
        other => other.to_string().chars().take(120).collect(),
    }
}

/// Sleeps `delay`; true when `stop` turned true meanwhile.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    if delay.is_zero() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// Writes what the connection sends (acks, pongs), batching what is queued into one flush, and
/// a WebSocket ping every `ping_interval`; closes the socket when the senders are gone.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Message>,
    ping_interval: Duration,
) {
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + ping_interval,
        ping_interval.max(Duration::from_millis(10)),
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            message = rx.recv() => {
                let Some(message) = message else { break };
                if sink.feed(message).await.is_err() {
                    return;
                }
                let mut more = 0;
                while more < 256 {
                    match rx.try_recv() {
                        Ok(message) => {
                            if sink.feed(message).await.is_err() {
                                return;
                            }
                            more += 1;
                        }
                        Err(_) => break,
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_frame(data: Value) -> String {
        json!({
            "specVersion": "1.0", "type": "EVENT",
            "headers": {"topic": "*", "messageId": "m1", "contentType": "application/json",
                        "time": "1693221579964", "eventType": "user_add_org", "eventId": "e-1",
                        "eventCorpId": "dingcorp", "eventBornTime": "1683533823336",
                        "eventUnifiedAppId": "u"},
            "data": data,
        })
        .to_string()
    }

    #[test]
    fn an_event_frame_makes_the_push_payload_and_key() {
        let frame = Frame::parse(&event_frame(json!(
            "{\"UserId\":[\"u1\"],\"eventId\":\"other\"}"
        )))
        .unwrap();
        assert_eq!(frame.kind, FrameKind::Event);
        let (event, ok) = event_from_frame(&frame, 5);
        assert!(ok);
        assert_eq!(event.dedup_key, "event:e-1");
        assert_eq!(event.event_type, "user_add_org");
        assert_eq!(event.corp_id.as_deref(), Some("dingcorp"));
        assert_eq!(event.source, Source::Stream);
        let payload: Value = serde_json::from_str(&event.payload).unwrap();
        assert_eq!(payload["UserId"], json!(["u1"]));
        assert_eq!(payload["EventTime"], json!(1683533823336_i64));
        assert_eq!(payload["eventId"], json!("e-1"));
        // The same event pushed over HTTP has the same key.
        let pushed = br#"{"EventType":"user_add_org","eventId":"e-1","CorpId":"dingcorp"}"#;
        let (envelope, _) = Envelope::parse(pushed).unwrap();
        assert_eq!(envelope.dedup_key(pushed), event.dedup_key);
    }

    #[test]
    fn bad_data_is_kept_raw_and_bad_frames_are_named() {
        for data in [json!("not json"), json!("[1,2]"), json!(7)] {
            let frame = Frame::parse(&event_frame(data.clone())).unwrap();
            let (event, ok) = event_from_frame(&frame, 1);
            assert!(!ok);
            assert_eq!(event.dedup_key, "event:e-1");
            let payload: Value = serde_json::from_str(&event.payload).unwrap();
            assert!(payload.get(RAW_DATA_KEY).is_some(), "{payload}");
        }
        let code = |text: &str| Frame::parse(text).unwrap_err().code();
        assert_eq!(code("nope"), "not_json");
        assert_eq!(code("[1]"), "not_object");
        assert_eq!(code(r#"{"type":"EVENT"}"#), "no_headers");
        assert_eq!(code(r#"{"type":"EVENT","headers":{}}"#), "no_message_id");
        assert_eq!(
            code(r#"{"type":"WHAT","headers":{"messageId":"m"}}"#),
            "unknown_type"
        );
    }

    #[test]
    fn robot_messages_are_keyed_by_msg_id() {
        let text = json!({"type": "CALLBACK", "headers": {"messageId": "m", "topic": ROBOT_TOPIC},
            "data": "{\"msgId\":\"msgA\",\"senderCorpId\":\"dingc\",\"text\":{\"content\":\"ack\"}}"})
        .to_string();
        let event = robot_event(&Frame::parse(&text).unwrap(), 1).unwrap();
        assert_eq!(event.dedup_key, "robot:msgA");
        assert_eq!(event.event_type, ROBOT_EVENT_TYPE);
        assert_eq!(event.corp_id.as_deref(), Some("dingc"));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_below() {
        let config = StreamConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_jitter: 0.2,
            ..StreamConfig::default()
        };
        assert_eq!(backoff(&config, 0), Duration::ZERO);
        for (failures, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (100, 60)] {
            let d = backoff(&config, failures);
            let full = Duration::from_secs(full);
            assert!(d <= full && d >= full.mul_f64(0.8), "{failures}: {d:?}");
        }
    }

    #[test]
    fn acks_have_the_wire_shape() {
        let a: Value = serde_json::from_str(&event_ack("m", true, "success")).unwrap();
        assert_eq!(a["code"], 200);
        assert_eq!(a["headers"]["messageId"], "m");
        let data: Value = serde_json::from_str(a["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["status"], "SUCCESS");
        let l: Value = serde_json::from_str(&event_ack("m", false, "x")).unwrap();
        let data: Value = serde_json::from_str(l["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["status"], "LATER");
    }
}
