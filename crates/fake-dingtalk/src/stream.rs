//! Stream mode: `POST /v1.0/gateway/connections/open` (credentials, one-shot tickets), the
//! `/connect` WebSocket, and the queue of EVENT and robot CALLBACK messages pushed over it, as
//! DingTalk's Stream gateway and the official SDKs speak it.
//!
//! Messages wait in a queue shared by the connections; each goes to one connection (round-robin
//! among those subscribed with room in their window of un-acked frames). An EVENT that is
//! answered `LATER` (or an error code), that is not acknowledged within the ack timeout, or that
//! was in flight on a connection that ended is delivered again later, with a new `messageId` and
//! the same `eventId`. Robot CALLBACK messages are fire-and-forget, as on DingTalk: they are not
//! delivered again. SYSTEM `ping` and `disconnect` frames, abrupt drops and a silent connection
//! are scripted through the `/_fake/stream/…` admin routes, and everything seen is recorded
//! ([`StreamReport`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

use crate::admin::parse_body;
use crate::{FakeDingTalk, FakeState};

/// Where a Stream client opens a connection (with its AppKey / AppSecret).
pub const OPEN_PATH: &str = "/v1.0/gateway/connections/open";
/// The WebSocket path `connections/open` points to (`ws://HOST/connect`).
pub const CONNECT_PATH: &str = "/connect";
/// The CALLBACK topic of robot messages.
pub const ROBOT_TOPIC: &str = "/v1.0/im/bot/messages/get";

/// How often each connection checks ack timeouts, due redeliveries and silences.
const TICK: Duration = Duration::from_millis(20);
/// Oldest frame records are forgotten beyond this many.
const MAX_FRAME_RECORDS: usize = 200_000;
/// Oldest bad acks are forgotten beyond this many.
const MAX_BAD_ACKS: usize = 1_000;
/// A bad ack's text is kept up to this many bytes.
const BAD_ACK_TEXT_BYTES: usize = 512;

/// The Stream knobs. `POST /_fake/stream/settings` takes any subset of the fields.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// How long a ticket can be used, checked when the WebSocket connects (DingTalk: 90 s).
    pub ticket_ttl_ms: u64,
    /// Un-acked EVENT/CALLBACK frames per connection; no more are sent until acks free room.
    pub window: usize,
    /// An EVENT not acknowledged this long after it was sent is delivered again.
    pub ack_timeout_ms: u64,
    /// Delay before an EVENT answered `LATER`, timed out or dropped is delivered again.
    pub redelivery_delay_ms: u64,
    /// After a `disconnect` frame, the socket is closed this much later (DingTalk: about 10 s).
    pub disconnect_close_ms: u64,
    /// Every Nth EVENT acknowledged `SUCCESS` is delivered once more (0: never).
    pub duplicate_every: u64,
    /// A SYSTEM `ping` on each connection this often (0: only when asked).
    pub ping_interval_ms: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            ticket_ttl_ms: 90_000,
            window: 64,
            ack_timeout_ms: 10_000,
            redelivery_delay_ms: 1_000,
            disconnect_close_ms: 10_000,
            duplicate_every: 0,
            ping_interval_ms: 0,
        }
    }
}

/// An event to push as an EVENT frame. Field names are the frame headers' (`corpId` is
/// accepted for `eventCorpId`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct StreamEvent {
    /// `eventType` header (required).
    pub event_type: String,
    /// `eventId` header; a fresh one if absent.
    pub event_id: Option<String>,
    /// `eventCorpId` header; `dingfakecorpid` if absent.
    #[serde(alias = "corpId")]
    pub event_corp_id: Option<String>,
    /// `eventBornTime` header (epoch ms); the time it was queued if absent.
    pub event_born_time: Option<i64>,
    /// `eventUnifiedAppId` header; `fake-unified-app-id` if absent.
    pub event_unified_app_id: Option<String>,
    /// The business fields, sent as a JSON string in `data` (`{}` if absent).
    pub data: Value,
    /// Sent verbatim as the `data` string instead of `data` (for malformed-frame tests).
    pub raw_data: Option<String>,
    /// Extra headers (values other than strings are sent as their JSON text); `null` removes
    /// a header the fake would send.
    pub headers: Map<String, Value>,
}

impl StreamEvent {
    /// An event of `event_type` with id `event_id` and business fields `data`.
    pub fn new(event_type: &str, event_id: &str, data: Value) -> Self {
        StreamEvent {
            event_type: event_type.to_owned(),
            event_id: Some(event_id.to_owned()),
            data,
            ..StreamEvent::default()
        }
    }
}

/// A connection as recorded.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ConnectionRecord {
    /// Connection id, from 1 (unique for the fake's life, resets included).
    pub id: u64,
    /// `clientId` it was opened with.
    pub client_id: String,
    /// `ua` it was opened with.
    pub ua: Option<String>,
    /// `localIp` it was opened with.
    pub local_ip: Option<String>,
    /// `subscriptions` it was opened with (`[{"type", "topic"}]`).
    pub subscriptions: Vec<Subscription>,
    /// `open`, `draining` (a `disconnect` was sent), `silent` or `closed`.
    pub state: String,
    /// Why it ended (`closed by the client`, `dropped by the fake`, …).
    pub close_reason: Option<String>,
    /// Milliseconds since the fake started.
    pub opened_at_ms: f64,
    /// Milliseconds since the fake started.
    pub closed_at_ms: Option<f64>,
    /// Frames sent on it (all types).
    pub frames_sent: u64,
    /// Text frames received on it (acks, good or bad).
    pub frames_received: u64,
    /// EVENT/CALLBACK frames sent on it and not acknowledged yet.
    pub in_flight: usize,
}

/// One entry of a connection's `subscriptions`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Subscription {
    /// `EVENT`, `CALLBACK` or `SYSTEM`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `*` for EVENT; a topic for CALLBACK (`/v1.0/im/bot/messages/get`) and SYSTEM.
    pub topic: String,
}

/// A frame the fake sent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FrameRecord {
    /// Connection id.
    pub connection: u64,
    /// `EVENT`, `CALLBACK`, `SYSTEM` or `RAW` (sent verbatim through the admin route).
    #[serde(rename = "type")]
    pub kind: String,
    /// `topic` header (`*`, the robot topic, `ping`, `disconnect`, …).
    pub topic: String,
    /// `messageId` header (empty for RAW).
    pub message_id: String,
    /// `eventId` (EVENT) or the robot message's `msgId` (CALLBACK).
    pub event_id: Option<String>,
    /// 1 for the first delivery, then 2, 3, … (duplicates included).
    pub attempt: u32,
    /// A delivery of an event already acknowledged `SUCCESS` (duplicate delivery).
    pub duplicate: bool,
    /// Milliseconds since the fake started.
    pub at_ms: f64,
}

/// An answer the fake could not accept as an ack.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BadAck {
    /// Connection id.
    pub connection: u64,
    /// Why it is bad.
    pub reason: String,
    /// The frame's text (cut at 512 bytes).
    pub text: String,
}

/// What the Stream side saw: `GET /_fake/stream/state`, [`FakeDingTalk::stream_report`].
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct StreamReport {
    /// The settings in force.
    pub settings: StreamSettings,
    /// `connections/open` answered with a ticket.
    pub tickets_issued: u64,
    /// WebSocket connects refused before the upgrade, by reason: `missing`, `unknown`,
    /// `used`, `expired`.
    pub tickets_refused: BTreeMap<String, u64>,
    /// `connections/open` refused for credentials (401 `authFailed`).
    pub opens_refused: u64,
    /// `connections/open` refused for a malformed body (400).
    pub opens_malformed: u64,
    /// Every connection, oldest first.
    pub connections: Vec<ConnectionRecord>,
    /// Connections not closed.
    pub open_connections: usize,
    /// Messages waiting for a connection (redeliveries waiting for their delay included).
    pub queued: usize,
    /// EVENT/CALLBACK frames sent and not acknowledged, on all connections.
    pub in_flight: usize,
    /// Frames sent (all types).
    pub frames_sent: u64,
    /// The frames sent, oldest first (the newest 200 000; omitted with `?frames=false`).
    pub frames: Vec<FrameRecord>,
    /// EVENT deliveries caused by `LATER`, an error code, a time-out or a connection's end.
    pub redeliveries: u64,
    /// EVENT/CALLBACK frames not acknowledged within `ack_timeout_ms`.
    pub ack_timeouts: u64,
    /// Deliveries of events already acknowledged `SUCCESS`.
    pub duplicates_sent: u64,
    /// Acks of EVENT/CALLBACK frames by outcome: `SUCCESS`, `LATER`, `ERROR` (a code other
    /// than 200, not `LATER`), `CALLBACK` (robot message, code 200), `CALLBACK_ERROR`.
    pub acks: BTreeMap<String, u64>,
    /// eventIds acknowledged `SUCCESS` at least once (late acks included).
    pub acked_event_ids: BTreeSet<String>,
    /// Robot msgIds acknowledged with code 200.
    pub acked_callback_ids: BTreeSet<String>,
    /// Acks of frames already given up on (timed out, or their connection ended first).
    pub late_acks: u64,
    /// SYSTEM `ping` frames sent.
    pub pings_sent: u64,
    /// Pings answered correctly: code 200, same messageId, same data string.
    pub pings_echoed: u64,
    /// Acks of SYSTEM frames, by topic (a ping answered wrong is counted here and in
    /// `bad_acks`).
    pub system_acks: BTreeMap<String, u64>,
    /// Answers that were not acceptable acks (the newest 1 000).
    pub bad_acks: Vec<BadAck>,
    /// Bad acks in all.
    pub bad_ack_count: u64,
    /// Robot CALLBACK frames never acknowledged (timed out or their connection ended): not
    /// delivered again.
    pub lost_callbacks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Event,
    Callback,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Event => 0,
            Kind::Callback => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Event => "EVENT",
            Kind::Callback => "CALLBACK",
        }
    }
}

/// A message as queued: everything of the frame but `messageId` and `time`.
struct Outgoing {
    kind: Kind,
    /// eventId, or the robot message's msgId.
    id: String,
    topic: String,
    headers: Map<String, Value>,
    data: String,
}

struct Pending {
    msg: Arc<Outgoing>,
    attempt: u32,
    duplicate: bool,
    not_before: Option<Instant>,
}

struct InFlight {
    pending: Pending,
    sent_at: Instant,
}

struct Ticket {
    issued: Instant,
    used: bool,
    client_id: String,
    subscriptions: Vec<Subscription>,
    ua: Option<String>,
    local_ip: Option<String>,
}

enum Control {
    /// End the socket without a close frame.
    Drop,
    /// Send a close frame after this long.
    CloseAfter(Duration),
}

struct Conn {
    record: ConnectionRecord,
    live: bool,
    draining: bool,
    silent: bool,
    silent_until: Option<Instant>,
    in_flight: HashMap<String, InFlight>,
    /// SYSTEM frames awaiting an answer: messageId → (topic, data string).
    system: HashMap<String, (String, String)>,
    outbox: Vec<String>,
    controls: Vec<Control>,
    notify: Arc<Notify>,
    last_ping: Instant,
}

impl Conn {
    fn accepts(&self, kind: Kind) -> bool {
        self.record.subscriptions.iter().any(|s| match kind {
            Kind::Event => s.kind == "EVENT",
            Kind::Callback => s.kind == "CALLBACK" && s.topic == ROBOT_TOPIC,
        })
    }

    fn takes_more(&self, window: usize) -> bool {
        self.live && !self.draining && !self.silent && self.in_flight.len() < window
    }

    fn state_name(&self) -> &'static str {
        if !self.live {
            "closed"
        } else if self.silent {
            "silent"
        } else if self.draining {
            "draining"
        } else {
            "open"
        }
    }
}

/// The Stream side of the fake's state (under the fake's one lock).
pub(crate) struct StreamState {
    settings: StreamSettings,
    tickets: HashMap<String, Ticket>,
    conns: BTreeMap<u64, Conn>,
    /// Waiting messages, EVENT and CALLBACK apart (a connection may take one kind only).
    queues: [VecDeque<Pending>; 2],
    /// Redeliveries waiting for their delay.
    delayed: Vec<Pending>,
    round_robin: usize,
    /// Every event pushed, by eventId, to deliver an acknowledged one again.
    events: HashMap<String, Arc<Outgoing>>,
    /// Frames given up on (timed out, connection ended): messageId → (kind, id).
    retired: HashMap<String, (Kind, String)>,
    next_message: u64,
    success_acks: u64,
    frames: VecDeque<FrameRecord>,
    report: StreamReport,
}

impl Default for StreamState {
    fn default() -> Self {
        StreamState {
            settings: StreamSettings::default(),
            tickets: HashMap::new(),
            conns: BTreeMap::new(),
            queues: [VecDeque::new(), VecDeque::new()],
            delayed: Vec::new(),
            round_robin: 0,
            events: HashMap::new(),
            retired: HashMap::new(),
            next_message: 1,
            success_acks: 0,
            frames: VecDeque::new(),
            report: StreamReport::default(),
        }
    }
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn header_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A parsed `connections/open` body.
struct OpenRequest {
    client_id: String,
    client_secret: String,
    subscriptions: Vec<Subscription>,
    ua: Option<String>,
    local_ip: Option<String>,
}

fn parse_open(body: Option<&Value>) -> Result<OpenRequest, String> {
    let Some(Value::Object(body)) = body else {
        return Err("the body must be a JSON object".into());
    };
    let string = |key: &str| -> Result<String, String> {
        match body.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{key} must be a string")),
            None => Err(format!("{key} is missing")),
        }
    };
    let optional = |key: &str| -> Result<Option<String>, String> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key} must be a string")),
        }
    };
    let client_id = string("clientId")?;
    let client_secret = string("clientSecret")?;
    let Some(Value::Array(list)) = body.get("subscriptions") else {
        return Err("subscriptions must be an array".into());
    };
    if list.is_empty() {
        return Err("subscriptions is empty".into());
    }
    let mut subscriptions = Vec::with_capacity(list.len());
    for entry in list {
        let kind = entry.get("type").and_then(Value::as_str).unwrap_or("");
        let topic = entry.get("topic").and_then(Value::as_str).unwrap_or("");
        if !matches!(kind, "EVENT" | "CALLBACK" | "SYSTEM") {
            return Err(format!(
                "subscription type must be EVENT, CALLBACK or SYSTEM: {entry}"
            ));
        }
        if topic.is_empty() {
            return Err(format!("subscription without a topic: {entry}"));
        }
        if kind == "EVENT" && topic != "*" {
            return Err(format!(
                "EVENT subscriptions take topic \"*\" only: {entry}"
            ));
        }
        subscriptions.push(Subscription {
            kind: kind.to_owned(),
            topic: topic.to_owned(),
        });
    }
    Ok(OpenRequest {
        client_id,
        client_secret,
        subscriptions,
        ua: optional("ua")?,
        local_ip: optional("localIp")?,
    })
}

impl FakeState {
    /// `POST /v1.0/gateway/connections/open`: a one-shot ticket for the WebSocket.
    pub(crate) fn stream_open(
        &mut self,
        now: Instant,
        method: &Method,
        body: Option<&Value>,
        host: Option<&str>,
    ) -> (StatusCode, Value) {
        if *method != Method::POST {
            let request_id = self.request_id();
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"code": "MethodNotAllowed", "message": "connections/open is a POST", "requestid": request_id}),
            );
        }
        let request = match parse_open(body) {
            Ok(request) => request,
            Err(message) => {
                self.stream.report.opens_malformed += 1;
                let request_id = self.request_id();
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"code": "invalidParameter", "message": message, "requestid": request_id}),
                );
            }
        };
        if !self.credentials_accepted(&request.client_id, &request.client_secret) {
            self.stream.report.opens_refused += 1;
            let request_id = self.request_id();
            return (
                StatusCode::UNAUTHORIZED,
                json!({"code": "authFailed", "message": "鉴权失败", "requestid": request_id}),
            );
        }
        let ticket = uuid::Uuid::new_v4().to_string();
        self.stream.tickets.insert(
            ticket.clone(),
            Ticket {
                issued: now,
                used: false,
                client_id: request.client_id,
                subscriptions: request.subscriptions,
                ua: request.ua,
                local_ip: request.local_ip,
            },
        );
        self.stream.report.tickets_issued += 1;
        let host = host.filter(|h| !h.is_empty()).unwrap_or("127.0.0.1");
        (
            StatusCode::OK,
            json!({"endpoint": format!("ws://{host}{CONNECT_PATH}"), "ticket": ticket}),
        )
    }
}

impl StreamState {
    fn refuse_ticket(&mut self, reason: &str) {
        *self
            .report
            .tickets_refused
            .entry(reason.to_owned())
            .or_insert(0) += 1;
    }

    fn live_targets(&self, connection: Option<u64>) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(id, c)| c.live && connection.is_none_or(|want| want == **id))
            .map(|(id, _)| *id)
            .collect()
    }

    fn new_message_id(&mut self, now_ms: i64) -> String {
        let n = self.next_message;
        self.next_message += 1;
        let salt = uuid::Uuid::new_v4().simple().to_string();
        format!("{}_{n}_{now_ms:x}_{}", &salt[..8], &salt[8..12])
    }

    fn record_frame(&mut self, record: FrameRecord) {
        self.report.frames_sent += 1;
        if self.frames.len() >= MAX_FRAME_RECORDS {
            self.frames.pop_front();
        }
        self.frames.push_back(record);
    }

    fn bad_ack(&mut self, connection: u64, text: &str, reason: String) {
        self.report.bad_ack_count += 1;
        if self.report.bad_acks.len() >= MAX_BAD_ACKS {
            self.report.bad_acks.remove(0);
        }
        self.report.bad_acks.push(BadAck {
            connection,
            reason,
            text: cut(text, BAD_ACK_TEXT_BYTES),
        });
    }

    fn count_ack(&mut self, outcome: &str) {
        *self.report.acks.entry(outcome.to_owned()).or_insert(0) += 1;
    }

    fn enqueue(&mut self, pending: Pending) {
        if pending.not_before.is_some() {
            self.delayed.push(pending);
        } else {
            self.queues[pending.msg.kind.index()].push_back(pending);
        }
    }

    /// A message given up on: an EVENT comes again later, a CALLBACK is lost.
    fn redeliver(&mut self, mut pending: Pending, now: Instant) {
        match pending.msg.kind {
            Kind::Callback => self.report.lost_callbacks += 1,
            Kind::Event => {
                self.report.redeliveries += 1;
                pending.attempt += 1;
                let delay = Duration::from_millis(self.settings.redelivery_delay_ms);
                pending.not_before = (!delay.is_zero()).then(|| now + delay);
                self.enqueue(pending);
            }
        }
    }

    /// Sends a tracked SYSTEM frame on a live connection; returns its messageId.
    fn push_system(&mut self, id: u64, topic: &str, data: String, at_ms: f64) -> Option<String> {
        let now_ms = epoch_ms();
        let message_id = self.new_message_id(now_ms);
        let conn = self.conns.get_mut(&id).filter(|c| c.live)?;
        let frame = json!({
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {
                "topic": topic,
                "messageId": message_id,
                "contentType": "application/json",
                "time": now_ms.to_string(),
            },
            "data": data,
        });
        conn.outbox.push(frame.to_string());
        conn.system
            .insert(message_id.clone(), (topic.to_owned(), data));
        conn.record.frames_sent += 1;
        conn.notify.notify_one();
        if topic == "ping" {
            conn.last_ping = Instant::now();
            self.report.pings_sent += 1;
        }
        self.record_frame(FrameRecord {
            connection: id,
            kind: "SYSTEM".into(),
            topic: topic.to_owned(),
            message_id: message_id.clone(),
            event_id: None,
            attempt: 1,
            duplicate: false,
            at_ms,
        });
        Some(message_id)
    }

    fn ping(&mut self, id: u64, at_ms: f64) -> Option<String> {
        let opaque = uuid::Uuid::new_v4().to_string();
        self.push_system(id, "ping", json!({"opaque": opaque}).to_string(), at_ms)
    }

    /// Hands waiting messages to connections with room, round-robin.
    fn dispatch(&mut self, now: Instant, at_ms: f64) {
        let window = self.settings.window.max(1);
        for kind in [Kind::Event, Kind::Callback] {
            if self.queues[kind.index()].is_empty() {
                continue;
            }
            let ids: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.accepts(kind) && c.takes_more(window))
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            loop {
                let n = ids.len();
                let chosen = (0..n)
                    .map(|k| (k, ids[(self.round_robin + k) % n]))
                    .find(|(_, id)| self.conns.get(id).is_some_and(|c| c.takes_more(window)));
                let Some((k, id)) = chosen else { break };
                let Some(pending) = self.queues[kind.index()].pop_front() else {
                    break;
                };
                self.round_robin = self.round_robin.wrapping_add(k + 1);
                self.send(id, pending, now, at_ms);
            }
        }
    }

    fn send(&mut self, id: u64, pending: Pending, now: Instant, at_ms: f64) {
        let now_ms = epoch_ms();
        let message_id = self.new_message_id(now_ms);
        let Some(conn) = self.conns.get_mut(&id) else {
            self.enqueue(pending);
            return;
        };
        let msg = &pending.msg;
        let mut headers = msg.headers.clone();
        headers.insert("messageId".into(), json!(message_id));
        headers.insert("time".into(), json!(now_ms.to_string()));
        let frame = json!({
            "specVersion": "1.0",
            "type": msg.kind.name(),
            "headers": headers,
            "data": msg.data,
        });
        conn.outbox.push(frame.to_string());
        conn.record.frames_sent += 1;
        conn.notify.notify_one();
        let record = FrameRecord {
            connection: id,
            kind: msg.kind.name().into(),
            topic: msg.topic.clone(),
            message_id: message_id.clone(),
            event_id: Some(msg.id.clone()),
            attempt: pending.attempt,
            duplicate: pending.duplicate,
            at_ms,
        };
        if pending.duplicate {
            self.report.duplicates_sent += 1;
        }
        conn.in_flight.insert(
            message_id,
            InFlight {
                pending,
                sent_at: now,
            },
        );
        self.record_frame(record);
    }

    /// Time-driven work: due redeliveries, ack time-outs, silences ending, periodic pings.
    fn tick(&mut self, now: Instant, at_ms: f64) {
        if !self.delayed.is_empty() {
            let (due, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.delayed)
                .into_iter()
                .partition(|p| p.not_before.is_none_or(|t| t <= now));
            self.delayed = later;
            for mut pending in due {
                pending.not_before = None;
                self.enqueue(pending);
            }
        }
        let timeout = Duration::from_millis(self.settings.ack_timeout_ms);
        let mut expired = Vec::new();
        let ping_every = Duration::from_millis(self.settings.ping_interval_ms);
        let mut to_ping = Vec::new();
        for (id, conn) in self.conns.iter_mut().filter(|(_, c)| c.live) {
            let late: Vec<String> = conn
                .in_flight
                .iter()
                .filter(|(_, f)| now.saturating_duration_since(f.sent_at) >= timeout)
                .map(|(m, _)| m.clone())
                .collect();
            for message_id in late {
                if let Some(flight) = conn.in_flight.remove(&message_id) {
                    expired.push((message_id, flight.pending));
                }
            }
            if conn.silent && conn.silent_until.is_some_and(|t| t <= now) {
                conn.silent = false;
                conn.silent_until = None;
                conn.notify.notify_one();
            }
            if !ping_every.is_zero()
                && !conn.silent
                && now.saturating_duration_since(conn.last_ping) >= ping_every
            {
                to_ping.push(*id);
            }
        }
        for (message_id, pending) in expired {
            self.report.ack_timeouts += 1;
            self.retired
                .insert(message_id, (pending.msg.kind, pending.msg.id.clone()));
            self.redeliver(pending, now);
        }
        for id in to_ping {
            self.ping(id, at_ms);
        }
        self.dispatch(now, at_ms);
    }

    /// A text frame from the client: an ack of something sent on this connection.
    fn receive(&mut self, id: u64, text: &str, now: Instant, at_ms: f64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.record.frames_received += 1;
        }
        let parsed: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => return self.bad_ack(id, text, format!("not JSON: {e}")),
        };
        let Some(message_id) = parsed.pointer("/headers/messageId").and_then(Value::as_str) else {
            return self.bad_ack(id, text, "no headers.messageId string".into());
        };
        let Some(code) = parsed.get("code").and_then(Value::as_i64) else {
            return self.bad_ack(id, text, "no numeric code".into());
        };
        let data = parsed.get("data");
        let message_id = message_id.to_owned();

        // A SYSTEM frame's answer.
        let system = self
            .conns
            .get_mut(&id)
            .and_then(|c| c.system.remove(&message_id));
        if let Some((topic, sent)) = system {
            *self.report.system_acks.entry(topic.clone()).or_insert(0) += 1;
            if topic == "ping" {
                if code == 200 && data.and_then(Value::as_str) == Some(sent.as_str()) {
                    self.report.pings_echoed += 1;
                } else {
                    self.bad_ack(
                        id,
                        text,
                        "a ping's answer must be code 200 with the ping's data string".into(),
                    );
                }
            }
            return;
        }

        // An EVENT or CALLBACK in flight on this connection.
        let kind = self
            .conns
            .get(&id)
            .and_then(|c| c.in_flight.get(&message_id))
            .map(|f| f.pending.msg.kind);
        if let Some(kind) = kind {
            let outcome = match kind {
                Kind::Event => event_outcome(code, data),
                Kind::Callback => callback_outcome(code, data),
            };
            if let Outcome::Bad(reason) = outcome {
                // Stays in flight: the ack time-out delivers it again.
                return self.bad_ack(id, text, reason);
            }
            let Some(flight) = self
                .conns
                .get_mut(&id)
                .and_then(|c| c.in_flight.remove(&message_id))
            else {
                return;
            };
            self.settle(flight.pending, outcome, now);
            self.dispatch(now, at_ms);
            return;
        }

        // In flight on another connection: acks go back on the socket the frame came on.
        if let Some((other, _)) = self
            .conns
            .iter()
            .find(|(_, c)| c.in_flight.contains_key(&message_id))
        {
            let reason = format!("an ack on connection {id} of a frame sent on connection {other}");
            return self.bad_ack(id, text, reason);
        }

        // A frame given up on already (timed out, or its connection ended).
        if let Some((kind, event_id)) = self.retired.remove(&message_id) {
            self.report.late_acks += 1;
            let outcome = match kind {
                Kind::Event => event_outcome(code, data),
                Kind::Callback => callback_outcome(code, data),
            };
            match outcome {
                Outcome::Bad(reason) => self.bad_ack(id, text, reason),
                Outcome::Success => {
                    self.count_ack("SUCCESS");
                    self.report.acked_event_ids.insert(event_id);
                }
                Outcome::Later => self.count_ack("LATER"),
                Outcome::Error => self.count_ack("ERROR"),
                Outcome::CallbackOk => {
                    self.count_ack("CALLBACK");
                    self.report.acked_callback_ids.insert(event_id);
                }
                Outcome::CallbackError => self.count_ack("CALLBACK_ERROR"),
            }
            return;
        }
        self.bad_ack(
            id,
            text,
            format!("unknown or already acknowledged messageId {message_id:?}"),
        );
    }

    /// What an accepted ack does to the message.
    fn settle(&mut self, pending: Pending, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Success => {
                self.count_ack("SUCCESS");
                self.report.acked_event_ids.insert(pending.msg.id.clone());
                if !pending.duplicate {
                    self.success_acks += 1;
                    let every = self.settings.duplicate_every;
                    if every > 0 && self.success_acks % every == 0 {
                        self.enqueue(Pending {
                            msg: pending.msg,
                            attempt: pending.attempt + 1,
                            duplicate: true,
                            not_before: None,
                        });
                    }
                }
            }
            Outcome::Later => {
                self.count_ack("LATER");
                self.redeliver(pending, now);
            }
            Outcome::Error => {
                self.count_ack("ERROR");
                self.redeliver(pending, now);
            }
            Outcome::CallbackOk => {
                self.count_ack("CALLBACK");
                self.report
                    .acked_callback_ids
                    .insert(pending.msg.id.clone());
            }
            Outcome::CallbackError => self.count_ack("CALLBACK_ERROR"),
            Outcome::Bad(_) => {}
        }
    }

    /// A connection ended: what was in flight on it comes again elsewhere.
    fn closed(&mut self, id: u64, reason: &str, now: Instant, at_ms: f64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.live {
            return;
        }
        conn.live = false;
        conn.silent = false;
        conn.record.close_reason = Some(reason.to_owned());
        conn.record.closed_at_ms = Some(at_ms);
        conn.outbox.clear();
        conn.system.clear();
        conn.controls.clear();
        let in_flight: Vec<(String, InFlight)> = conn.in_flight.drain().collect();
        for (message_id, flight) in in_flight {
            self.retired.insert(
                message_id,
                (flight.pending.msg.kind, flight.pending.msg.id.clone()),
            );
            self.redeliver(flight.pending, now);
        }
        self.dispatch(now, at_ms);
    }

    fn report(&self, frames: bool) -> StreamReport {
        let mut report = self.report.clone();
        report.settings = self.settings.clone();
        report.connections = self
            .conns
            .values()
            .map(|c| {
                let mut record = c.record.clone();
                record.state = c.state_name().into();
                record.in_flight = c.in_flight.len();
                record
            })
            .collect();
        report.open_connections = self.conns.values().filter(|c| c.live).count();
        report.queued = self.queues.iter().map(VecDeque::len).sum::<usize>() + self.delayed.len();
        report.in_flight = self.conns.values().map(|c| c.in_flight.len()).sum();
        if frames {
            report.frames = self.frames.iter().cloned().collect();
        }
        report
    }
}

enum Outcome {
    Success,
    Later,
    Error,
    CallbackOk,
    CallbackError,
    Bad(String),
}

/// The ack of an EVENT (stream-mode.md §4): `data` is a JSON string with a `status`.
fn event_outcome(code: i64, data: Option<&Value>) -> Outcome {
    let status = match data {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(parsed) => parsed
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_owned),
            Err(_) if code == 200 => {
                return Outcome::Bad("data is not a JSON string of an object".into())
            }
            Err(_) => None,
        },
        Some(_) if code == 200 => {
            return Outcome::Bad("data must be a JSON string, not a JSON value".into())
        }
        Some(_) => None,
    };
    match (code, status.as_deref()) {
        (_, Some("LATER")) => Outcome::Later,
        (200, Some("SUCCESS")) => Outcome::Success,
        (200, Some(other)) => Outcome::Bad(format!("code 200 with status {other:?}")),
        (200, None) => Outcome::Bad("code 200 without a status in data".into()),
        (code, Some("SUCCESS")) => Outcome::Bad(format!("status SUCCESS with code {code}")),
        (_, _) => Outcome::Error,
    }
}

/// The ack of a robot CALLBACK: code 200 and `data` a JSON string (`{"response": …}`).
fn callback_outcome(code: i64, data: Option<&Value>) -> Outcome {
    if code != 200 {
        return Outcome::CallbackError;
    }
    match data {
        Some(Value::String(text)) if serde_json::from_str::<Value>(text).is_ok() => {
            Outcome::CallbackOk
        }
        _ => Outcome::Bad("a CALLBACK ack's data must be a JSON string".into()),
    }
}

/// What a connection's task takes from the state each turn.
struct Work {
    frames: Vec<String>,
    controls: Vec<Control>,
    silent: bool,
}

/// Fills what DingTalk always sends in a robot message and the caller left out.
fn robot_message(mut message: Map<String, Value>, now_ms: i64) -> Map<String, Value> {
    let short = uuid::Uuid::new_v4().simple().to_string();
    let defaults = [
        ("msgId", json!(format!("msg{short}"))),
        ("msgtype", json!("text")),
        ("createAt", json!(now_ms)),
        ("conversationType", json!("2")),
        ("conversationId", json!("cidfakeconversation==")),
        ("conversationTitle", json!("fake war room")),
        ("senderId", json!("$:LWCP_v1:$fakesender")),
        ("senderNick", json!("Fake Sender")),
        ("senderStaffId", json!("fakestaff01")),
        ("senderCorpId", json!("dingfakecorpid")),
        ("chatbotCorpId", json!("dingfakecorpid")),
        ("chatbotUserId", json!("$:LWCP_v1:$fakechatbot")),
        ("robotCode", json!("dingfakerobotcode")),
        ("isInAtList", json!(true)),
        ("isAdmin", json!(false)),
    ];
    for (key, value) in defaults {
        message.entry(key).or_insert(value);
    }
    if message.get("msgtype").and_then(Value::as_str) == Some("text") {
        message
            .entry("text")
            .or_insert_with(|| json!({"content": " hello"}));
    }
    message
}

impl FakeDingTalk {
    fn at_ms(&self, now: Instant) -> f64 {
        (now - self.shared.started).as_secs_f64() * 1000.0
    }

    /// The Stream settings in force.
    pub fn stream_settings(&self) -> StreamSettings {
        self.state().stream.settings.clone()
    }

    /// Replaces the Stream settings (read them, change a field, set them).
    pub fn set_stream_settings(&self, settings: StreamSettings) {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let mut state = self.state();
        state.stream.settings = settings;
        state.stream.dispatch(now, at_ms);
    }

    /// What the Stream side saw so far (with the list of frames sent).
    pub fn stream_report(&self) -> StreamReport {
        self.state().stream.report(true)
    }

    /// eventIds acknowledged `SUCCESS` so far.
    pub fn stream_acked_event_ids(&self) -> BTreeSet<String> {
        self.state().stream.report.acked_event_ids.clone()
    }

    /// How many distinct eventIds were acknowledged `SUCCESS` so far: for polling a large run
    /// without copying the set while the fake holds its lock.
    pub fn stream_acked_event_count(&self) -> usize {
        self.state().stream.report.acked_event_ids.len()
    }

    /// Queues events to push as EVENT frames; returns their eventIds in order. An event
    /// without `eventType` is refused (`Err` with the reason, nothing queued).
    pub fn stream_push_events(&self, events: Vec<StreamEvent>) -> Result<Vec<String>, String> {
        if let Some(bad) = events.iter().position(|e| e.event_type.is_empty()) {
            return Err(format!("event {bad} has no eventType"));
        }
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let now_ms = epoch_ms();
        let mut state = self.state();
        let stream = &mut state.stream;
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            let id = event
                .event_id
                .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
            let mut headers = Map::new();
            headers.insert("topic".into(), json!("*"));
            headers.insert("contentType".into(), json!("application/json"));
            headers.insert("eventType".into(), json!(event.event_type));
            headers.insert("eventId".into(), json!(id));
            headers.insert(
                "eventCorpId".into(),
                json!(event.event_corp_id.as_deref().unwrap_or("dingfakecorpid")),
            );
            headers.insert(
                "eventBornTime".into(),
                json!(event.event_born_time.unwrap_or(now_ms).to_string()),
            );
            headers.insert(
                "eventUnifiedAppId".into(),
                json!(event
                    .event_unified_app_id
                    .as_deref()
                    .unwrap_or("fake-unified-app-id")),
            );
            for (key, value) in event.headers {
                if value.is_null() {
                    headers.remove(&key);
                } else {
                    headers.insert(key, json!(header_text(&value)));
                }
            }
            let data = match event.raw_data {
                Some(raw) => raw,
                None if event.data.is_null() => "{}".to_owned(),
                None => event.data.to_string(),
            };
            let msg = Arc::new(Outgoing {
                kind: Kind::Event,
                id: id.clone(),
                topic: "*".into(),
                headers,
                data,
            });
            stream.events.insert(id.clone(), msg.clone());
            stream.enqueue(Pending {
                msg,
                attempt: 1,
                duplicate: false,
                not_before: None,
            });
            ids.push(id);
        }
        stream.dispatch(now, at_ms);
        Ok(ids)
    }

    /// Queues robot messages to push as CALLBACK frames (topic `/v1.0/im/bot/messages/get`);
    /// fields left out get DingTalk-like values. Returns their msgIds in order.
    pub fn stream_push_robot(&self, messages: Vec<Value>) -> Result<Vec<String>, String> {
        let mut objects = Vec::with_capacity(messages.len());
        for (i, message) in messages.into_iter().enumerate() {
            match message {
                Value::Object(object) => objects.push(object),
                _ => return Err(format!("robot message {i} is not a JSON object")),
            }
        }
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let now_ms = epoch_ms();
        let base = self.base_url();
        let mut state = self.state();
        let mut ids = Vec::with_capacity(objects.len());
        for mut object in objects {
            if !object.contains_key("sessionWebhook") {
                let expires = object
                    .get("sessionWebhookExpiredTime")
                    .and_then(Value::as_i64)
                    .unwrap_or(now_ms + crate::SESSION_TTL_MS);
                let session = uuid::Uuid::new_v4().simple().to_string();
                state.robot_sessions.insert(session.clone(), expires);
                let url = format!("{base}{}?session={session}", crate::SESSION_PATH);
                object.insert("sessionWebhook".into(), json!(url));
                object.insert("sessionWebhookExpiredTime".into(), json!(expires));
            }
            let message = robot_message(object, now_ms);
            let id = message.get("msgId").map(header_text).unwrap_or_default();
            let mut headers = Map::new();
            headers.insert("topic".into(), json!(ROBOT_TOPIC));
            headers.insert("contentType".into(), json!("application/json"));
            headers.insert("appId".into(), json!("fake-app-id"));
            let msg = Arc::new(Outgoing {
                kind: Kind::Callback,
                id: id.clone(),
                topic: ROBOT_TOPIC.into(),
                headers,
                data: Value::Object(message).to_string(),
            });
            state.stream.enqueue(Pending {
                msg,
                attempt: 1,
                duplicate: false,
                not_before: None,
            });
            ids.push(id);
        }
        state.stream.dispatch(now, at_ms);
        Ok(ids)
    }

    /// Delivers these already acknowledged events once more (new messageIds). Returns the ids
    /// that were never acknowledged `SUCCESS` (those are not queued).
    pub fn stream_duplicate(&self, event_ids: &[String]) -> Vec<String> {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let mut state = self.state();
        let stream = &mut state.stream;
        let mut unknown = Vec::new();
        for id in event_ids {
            let msg = stream
                .events
                .get(id)
                .filter(|_| stream.report.acked_event_ids.contains(id))
                .cloned();
            match msg {
                Some(msg) => stream.enqueue(Pending {
                    msg,
                    attempt: 2,
                    duplicate: true,
                    not_before: None,
                }),
                None => unknown.push(id.clone()),
            }
        }
        stream.dispatch(now, at_ms);
        unknown
    }

    /// Sends a SYSTEM `ping` (data `{"opaque": …}`) on one open connection, or on all.
    /// Returns the messageIds sent.
    pub fn stream_ping(&self, connection: Option<u64>) -> Vec<String> {
        let at_ms = self.at_ms(Instant::now());
        let mut state = self.state();
        let stream = &mut state.stream;
        let targets = stream.live_targets(connection);
        targets
            .into_iter()
            .filter_map(|id| stream.ping(id, at_ms))
            .collect()
    }

    /// Sends any tracked SYSTEM frame (topic and data object) on one open connection, or on
    /// all; its acks are counted in `system_acks`. Returns the messageIds sent.
    pub fn stream_system(&self, connection: Option<u64>, topic: &str, data: &Value) -> Vec<String> {
        let at_ms = self.at_ms(Instant::now());
        let mut state = self.state();
        let stream = &mut state.stream;
        let targets = stream.live_targets(connection);
        targets
            .into_iter()
            .filter_map(|id| stream.push_system(id, topic, data.to_string(), at_ms))
            .collect()
    }

    /// Sends a SYSTEM `disconnect` (data `{"reason": …}`) on one open connection, or on all,
    /// sends nothing new on it after, and closes it (close frame) `close_after` later (the
    /// `disconnect_close_ms` setting if `None`). Returns the connections told.
    pub fn stream_disconnect(
        &self,
        connection: Option<u64>,
        reason: &str,
        close_after: Option<Duration>,
    ) -> Vec<u64> {
        let at_ms = self.at_ms(Instant::now());
        let mut state = self.state();
        let stream = &mut state.stream;
        let delay = close_after
            .unwrap_or_else(|| Duration::from_millis(stream.settings.disconnect_close_ms));
        let targets = stream.live_targets(connection);
        for id in &targets {
            let data = json!({"reason": reason}).to_string();
            stream.push_system(*id, "disconnect", data, at_ms);
            if let Some(conn) = stream.conns.get_mut(id) {
                conn.draining = true;
                conn.controls.push(Control::CloseAfter(delay));
                conn.notify.notify_one();
            }
        }
        targets
    }

    /// Ends one open connection, or all, at once without a close frame (the TCP connection is
    /// just closed). Returns the connections dropped.
    pub fn stream_drop(&self, connection: Option<u64>) -> Vec<u64> {
        let mut state = self.state();
        let stream = &mut state.stream;
        let targets = stream.live_targets(connection);
        for id in &targets {
            if let Some(conn) = stream.conns.get_mut(id) {
                conn.controls.push(Control::Drop);
                conn.notify.notify_one();
            }
        }
        targets
    }

    /// Makes one open connection, or all, silent (`on`): nothing is sent or read on it, so
    /// WebSocket pings go unanswered and no frame comes; for `duration` if given. `on: false`
    /// ends the silence. A silent connection is given no new messages, and what it has in
    /// flight comes again elsewhere after the ack time-out; not reading, the fake notices a
    /// client that went away only when the silence ends. Returns the connections changed.
    pub fn stream_silence(
        &self,
        connection: Option<u64>,
        on: bool,
        duration: Option<Duration>,
    ) -> Vec<u64> {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let mut state = self.state();
        let stream = &mut state.stream;
        let targets = stream.live_targets(connection);
        for id in &targets {
            if let Some(conn) = stream.conns.get_mut(id) {
                conn.silent = on;
                conn.silent_until = duration.filter(|_| on).map(|d| now + d);
                conn.notify.notify_one();
            }
        }
        stream.dispatch(now, at_ms);
        targets
    }

    /// Sends `text` as is, as one text frame, on one open connection or on all (not tracked:
    /// for frames that are not JSON, unknown types, huge frames). Returns the connections.
    pub fn stream_send_raw(&self, connection: Option<u64>, text: &str) -> Vec<u64> {
        let at_ms = self.at_ms(Instant::now());
        let mut state = self.state();
        let stream = &mut state.stream;
        let targets = stream.live_targets(connection);
        for id in &targets {
            if let Some(conn) = stream.conns.get_mut(id) {
                conn.outbox.push(text.to_owned());
                conn.record.frames_sent += 1;
                conn.notify.notify_one();
            }
            stream.record_frame(FrameRecord {
                connection: *id,
                kind: "RAW".into(),
                topic: String::new(),
                message_id: String::new(),
                event_id: None,
                attempt: 1,
                duplicate: false,
                at_ms,
            });
        }
        targets
    }

    /// Wakes every connection task (after a reset, so they find themselves gone).
    pub(crate) fn stream_notifiers(&self) -> Vec<Arc<Notify>> {
        self.state()
            .stream
            .conns
            .values()
            .filter(|c| c.live)
            .map(|c| c.notify.clone())
            .collect()
    }

    /// Checks and uses a ticket; registers the connection.
    fn stream_accept(&self, ticket: &str) -> Result<(u64, Arc<Notify>), &'static str> {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        let mut state = self.state();
        let stream = &mut state.stream;
        let ttl = Duration::from_millis(stream.settings.ticket_ttl_ms);
        let refusal = match stream.tickets.get(ticket) {
            None => Some("unknown"),
            Some(t) if t.used => Some("used"),
            Some(t) if now.saturating_duration_since(t.issued) >= ttl => Some("expired"),
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            stream.refuse_ticket(reason);
            return Err(reason);
        }
        let Some(ticket) = stream.tickets.get_mut(ticket) else {
            return Err("unknown");
        };
        ticket.used = true;
        let id = self
            .shared
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let record = ConnectionRecord {
            id,
            client_id: ticket.client_id.clone(),
            ua: ticket.ua.clone(),
            local_ip: ticket.local_ip.clone(),
            subscriptions: ticket.subscriptions.clone(),
            state: "open".into(),
            close_reason: None,
            opened_at_ms: at_ms,
            closed_at_ms: None,
            frames_sent: 0,
            frames_received: 0,
            in_flight: 0,
        };
        stream.conns.insert(
            id,
            Conn {
                record,
                live: true,
                draining: false,
                silent: false,
                silent_until: None,
                in_flight: HashMap::new(),
                system: HashMap::new(),
                outbox: Vec::new(),
                controls: Vec::new(),
                notify: notify.clone(),
                last_ping: now,
            },
        );
        stream.dispatch(now, at_ms);
        Ok((id, notify))
    }

    fn stream_work(&self, id: u64) -> Option<Work> {
        let mut state = self.state();
        let conn = state.stream.conns.get_mut(&id).filter(|c| c.live)?;
        let frames = if conn.silent {
            Vec::new()
        } else {
            std::mem::take(&mut conn.outbox)
        };
        Some(Work {
            frames,
            controls: std::mem::take(&mut conn.controls),
            silent: conn.silent,
        })
    }

    fn stream_tick(&self) {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        self.state().stream.tick(now, at_ms);
    }

    fn stream_receive(&self, id: u64, text: &str) {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        self.state().stream.receive(id, text, now, at_ms);
    }

    fn stream_bad_frame(&self, id: u64, reason: &str) {
        let mut state = self.state();
        if let Some(conn) = state.stream.conns.get_mut(&id) {
            conn.record.frames_received += 1;
        }
        state.stream.bad_ack(id, "", reason.to_owned());
    }

    fn stream_closed(&self, id: u64, reason: &str) {
        let now = Instant::now();
        let at_ms = self.at_ms(now);
        self.state().stream.closed(id, reason, now, at_ms);
    }
}

/// `GET /connect?ticket=…`: the WebSocket, refused before the upgrade for a missing, unknown,
/// used or expired ticket.
pub(crate) async fn connect(
    State(fake): State<FakeDingTalk>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let refuse = |status: StatusCode, message: String| {
        let body = json!({"code": "invalidTicket", "message": message});
        (status, axum::Json(body)).into_response()
    };
    let Some(ticket) = query.get("ticket").filter(|t| !t.is_empty()) else {
        fake.state().stream.refuse_ticket("missing");
        return refuse(StatusCode::BAD_REQUEST, "no ticket".into());
    };
    // Not a WebSocket handshake: refused without using the ticket.
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let (id, notify) = match fake.stream_accept(ticket) {
        Ok(accepted) => accepted,
        Err(reason) => return refuse(StatusCode::UNAUTHORIZED, format!("ticket {reason}")),
    };
    let on_failure = fake.clone();
    upgrade
        .on_failed_upgrade(move |e| {
            on_failure.stream_closed(id, &format!("WebSocket upgrade failed: {e}"))
        })
        .on_upgrade(move |socket| run_connection(fake, id, notify, socket))
}

async fn run_connection(fake: FakeDingTalk, id: u64, notify: Arc<Notify>, mut socket: WebSocket) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut close_at: Option<Instant> = None;
    let reason: Option<String> = 'conn: loop {
        let Some(work) = fake.stream_work(id) else {
            // Gone from the state (a reset): end the socket.
            break None;
        };
        for control in work.controls {
            match control {
                Control::Drop => break 'conn Some("dropped by the fake (no close frame)".into()),
                Control::CloseAfter(delay) => {
                    let at = Instant::now() + delay;
                    close_at = Some(close_at.map_or(at, |c| c.min(at)));
                }
            }
        }
        for frame in work.frames {
            if let Err(e) = socket.send(Message::Text(frame.into())).await {
                break 'conn Some(format!("send failed: {e}"));
            }
        }
        tokio::select! {
            () = notify.notified() => {}
            _ = tick.tick() => fake.stream_tick(),
            () = tokio::time::sleep_until(close_at.unwrap_or_else(Instant::now)), if close_at.is_some() => {
                let close = CloseFrame { code: 1000, reason: "disconnect".into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                break Some("closed by the fake after disconnect".into());
            }
            incoming = socket.recv(), if !work.silent => match incoming {
                Some(Ok(Message::Text(text))) => fake.stream_receive(id, text.as_str()),
                Some(Ok(Message::Binary(_))) => {
                    fake.stream_bad_frame(id, "a binary frame (acks are text frames)");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let detail = frame.map(|f| format!(" ({} {})", f.code, f.reason)).unwrap_or_default();
                    break Some(format!("closed by the client{detail}"));
                }
                Some(Err(e)) => break Some(format!("read failed: {e}")),
                None => break Some("the client went away".into()),
            },
        }
    };
    if let Some(reason) = reason {
        tracing::debug!(connection = id, %reason, "fake Stream connection ended");
        fake.stream_closed(id, &reason);
    }
}

// ---- admin routes: /_fake/stream/… ----

pub(crate) fn admin_routes() -> Router<FakeDingTalk> {
    Router::new()
        .route("/state", get(admin_state))
        .route("/settings", post(admin_settings))
        .route("/events", post(admin_events))
        .route("/events/generate", post(admin_generate))
        .route("/robot", post(admin_robot))
        .route("/duplicate", post(admin_duplicate))
        .route("/ping", post(admin_ping))
        .route("/system", post(admin_system))
        .route("/disconnect", post(admin_disconnect))
        .route("/drop", post(admin_drop))
        .route("/silence", post(admin_silence))
        .route("/raw", post(admin_raw))
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": message})),
    )
        .into_response()
}

/// Which connection an admin action targets (all open ones if absent).
#[derive(Default, Deserialize)]
#[serde(default)]
struct Target {
    connection: Option<u64>,
}

/// 404 when a named connection is not open.
fn targeted<T>(connection: Option<u64>, done: &[T]) -> Option<Response> {
    match connection {
        Some(id) if done.is_empty() => Some(
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("no open connection {id}")})),
            )
                .into_response(),
        ),
        _ => None,
    }
}

#[derive(Deserialize)]
struct StateQuery {
    frames: Option<bool>,
}

async fn admin_state(State(fake): State<FakeDingTalk>, Query(q): Query<StateQuery>) -> Response {
    let report = fake.state().stream.report(q.frames.unwrap_or(true));
    axum::Json(report).into_response()
}

async fn admin_settings(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let patch: Map<String, Value> = match parse_body(&body) {
        Ok(patch) => patch,
        Err(r) => return r.into_response(),
    };
    let mut merged = match serde_json::to_value(fake.stream_settings()) {
        Ok(Value::Object(current)) => current,
        _ => Map::new(),
    };
    merged.extend(patch);
    match serde_json::from_value::<StreamSettings>(Value::Object(merged)) {
        Ok(settings) => {
            fake.set_stream_settings(settings.clone());
            axum::Json(settings).into_response()
        }
        Err(e) => bad_request(format!("bad settings: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::Many(list) => list,
            OneOrMany::One(one) => vec![one],
        }
    }
}

async fn admin_events(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let events = match parse_body::<OneOrMany<StreamEvent>>(&body) {
        Ok(events) => events.into_vec(),
        Err(r) => return r.into_response(),
    };
    match fake.stream_push_events(events) {
        Ok(ids) => {
            axum::Json(json!({"ok": true, "queued": ids.len(), "event_ids": ids})).into_response()
        }
        Err(message) => bad_request(message),
    }
}

#[derive(Deserialize)]
struct GenerateBody {
    count: usize,
    id_prefix: Option<String>,
    #[serde(default)]
    event: Option<StreamEvent>,
}

async fn admin_generate(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: GenerateBody = match parse_body(&body) {
        Ok(body) => body,
        Err(r) => return r.into_response(),
    };
    let template = body.event.unwrap_or_else(|| StreamEvent {
        event_type: "fake_stream_event".into(),
        ..StreamEvent::default()
    });
    let prefix = body.id_prefix.unwrap_or_else(|| {
        let short = uuid::Uuid::new_v4().simple().to_string();
        format!("gen-{}-", &short[..8])
    });
    let events = (1..=body.count)
        .map(|i| {
            let mut event = template.clone();
            event.event_id = Some(format!("{prefix}{i}"));
            if event.data.is_null() {
                event.data = json!({"seq": i});
            }
            event
        })
        .collect();
    match fake.stream_push_events(events) {
        Ok(ids) => {
            let first = ids.first().cloned();
            let last = ids.last().cloned();
            axum::Json(json!({"ok": true, "queued": ids.len(), "first": first, "last": last}))
                .into_response()
        }
        Err(message) => bad_request(message),
    }
}

async fn admin_robot(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let messages = match parse_body::<OneOrMany<Value>>(&body) {
        Ok(messages) => messages.into_vec(),
        Err(r) => return r.into_response(),
    };
    match fake.stream_push_robot(messages) {
        Ok(ids) => {
            axum::Json(json!({"ok": true, "queued": ids.len(), "msg_ids": ids})).into_response()
        }
        Err(message) => bad_request(message),
    }
}

#[derive(Deserialize)]
struct DuplicateBody {
    event_ids: Vec<String>,
}

async fn admin_duplicate(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: DuplicateBody = match parse_body(&body) {
        Ok(body) => body,
        Err(r) => return r.into_response(),
    };
    let unknown = fake.stream_duplicate(&body.event_ids);
    let queued = body.event_ids.len() - unknown.len();
    axum::Json(json!({"ok": true, "queued": queued, "unknown": unknown})).into_response()
}

async fn admin_ping(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let target: Target = match parse_body::<Option<Target>>(&body) {
        Ok(target) => target.unwrap_or_default(),
        Err(r) => return r.into_response(),
    };
    let sent = fake.stream_ping(target.connection);
    if let Some(r) = targeted(target.connection, &sent) {
        return r;
    }
    axum::Json(json!({"ok": true, "message_ids": sent})).into_response()
}

#[derive(Deserialize)]
struct SystemBody {
    connection: Option<u64>,
    topic: String,
    #[serde(default)]
    data: Value,
}

async fn admin_system(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: SystemBody = match parse_body(&body) {
        Ok(body) => body,
        Err(r) => return r.into_response(),
    };
    let data = if body.data.is_null() {
        json!({})
    } else {
        body.data
    };
    let sent = fake.stream_system(body.connection, &body.topic, &data);
    if let Some(r) = targeted(body.connection, &sent) {
        return r;
    }
    axum::Json(json!({"ok": true, "message_ids": sent})).into_response()
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct DisconnectBody {
    connection: Option<u64>,
    reason: Option<String>,
    close_after_ms: Option<u64>,
}

async fn admin_disconnect(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: DisconnectBody = match parse_body::<Option<DisconnectBody>>(&body) {
        Ok(body) => body.unwrap_or_default(),
        Err(r) => return r.into_response(),
    };
    let reason = body.reason.as_deref().unwrap_or("fake load balancing");
    let done = fake.stream_disconnect(
        body.connection,
        reason,
        body.close_after_ms.map(Duration::from_millis),
    );
    if let Some(r) = targeted(body.connection, &done) {
        return r;
    }
    axum::Json(json!({"ok": true, "connections": done})).into_response()
}

async fn admin_drop(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let target: Target = match parse_body::<Option<Target>>(&body) {
        Ok(target) => target.unwrap_or_default(),
        Err(r) => return r.into_response(),
    };
    let done = fake.stream_drop(target.connection);
    if let Some(r) = targeted(target.connection, &done) {
        return r;
    }
    axum::Json(json!({"ok": true, "connections": done})).into_response()
}

#[derive(Deserialize)]
#[serde(default)]
struct SilenceBody {
    connection: Option<u64>,
    on: bool,
    ms: Option<u64>,
}

impl Default for SilenceBody {
    fn default() -> Self {
        SilenceBody {
            connection: None,
            on: true,
            ms: None,
        }
    }
}

async fn admin_silence(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: SilenceBody = match parse_body::<Option<SilenceBody>>(&body) {
        Ok(body) => body.unwrap_or_default(),
        Err(r) => return r.into_response(),
    };
    let done = fake.stream_silence(body.connection, body.on, body.ms.map(Duration::from_millis));
    if let Some(r) = targeted(body.connection, &done) {
        return r;
    }
    axum::Json(json!({"ok": true, "connections": done})).into_response()
}

#[derive(Deserialize)]
struct RawBody {
    connection: Option<u64>,
    text: String,
}

async fn admin_raw(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: RawBody = match parse_body(&body) {
        Ok(body) => body,
        Err(r) => return r.into_response(),
    };
    let done = fake.stream_send_raw(body.connection, &body.text);
    if let Some(r) = targeted(body.connection, &done) {
        return r;
    }
    axum::Json(json!({"ok": true, "connections": done})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_acks_are_read_as_the_sdks_write_them() {
        let success = json!("{\"status\":\"SUCCESS\",\"message\":\"success\"}");
        let later = json!("{\"status\":\"LATER\"}");
        assert!(matches!(
            event_outcome(200, Some(&success)),
            Outcome::Success
        ));
        assert!(matches!(event_outcome(200, Some(&later)), Outcome::Later));
        // The Go SDK answers LATER with code 500.
        assert!(matches!(event_outcome(500, Some(&later)), Outcome::Later));
        assert!(matches!(event_outcome(500, None), Outcome::Error));
        assert!(matches!(
            event_outcome(404, Some(&json!("x"))),
            Outcome::Error
        ));
        // data as an object instead of a string, no status, SUCCESS with an error code: bad.
        let object = json!({"status": "SUCCESS"});
        assert!(matches!(event_outcome(200, Some(&object)), Outcome::Bad(_)));
        assert!(matches!(
            event_outcome(200, Some(&json!("{}"))),
            Outcome::Bad(_)
        ));
        assert!(matches!(
            event_outcome(500, Some(&success)),
            Outcome::Bad(_)
        ));
        assert!(matches!(event_outcome(200, None), Outcome::Bad(_)));
    }

    #[test]
    fn connections_open_bodies_are_checked() {
        let good = json!({"clientId": "k", "clientSecret": "s",
            "subscriptions": [{"type": "EVENT", "topic": "*"},
                              {"type": "CALLBACK", "topic": ROBOT_TOPIC},
                              {"type": "SYSTEM", "topic": "ping"}],
            "ua": "dinghook/0.1", "localIp": "10.0.0.5"});
        let parsed = parse_open(Some(&good)).map_err(|e| e.to_string());
        assert_eq!(parsed.map(|r| r.subscriptions.len()), Ok(3));
        let bad = [
            json!("text"),
            json!({"clientSecret": "s", "subscriptions": [{"type": "EVENT", "topic": "*"}]}),
            json!({"clientId": "k", "clientSecret": "s"}),
            json!({"clientId": "k", "clientSecret": "s", "subscriptions": []}),
            json!({"clientId": "k", "clientSecret": "s", "subscriptions": [{"type": "EVENT", "topic": "user_add_org"}]}),
            json!({"clientId": "k", "clientSecret": "s", "subscriptions": [{"type": "PUSH", "topic": "*"}]}),
            json!({"clientId": "k", "clientSecret": "s", "subscriptions": [{"type": "EVENT", "topic": "*"}], "ua": 5}),
        ];
        for body in bad {
            assert!(parse_open(Some(&body)).is_err(), "accepted {body}");
        }
        assert!(parse_open(None).is_err());
    }

    #[test]
    fn cut_keeps_char_boundaries() {
        assert_eq!(cut("鉴权失败", 4), "鉴…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
