//! The fake's Stream mode on its own, driven by a real WebSocket client (tokio-tungstenite) and
//! the `/_fake/stream/…` admin routes over HTTP: connections/open, one-shot tickets, EVENT and
//! CALLBACK frames, acks, redelivery, SYSTEM ping and disconnect, drops and silence.

use std::time::Duration;

use fake_dingtalk::{FakeDingTalk, StreamEvent, ROBOT_TOPIC};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

const APP_KEY: &str = "dingstreamappkey";
const APP_SECRET: &str = "stream-app-secret";
/// Long enough for a frame that must come, on a loaded 2-core machine.
const COMES: Duration = Duration::from_secs(5);
/// How long to watch for a frame that must not come.
const QUIET: Duration = Duration::from_millis(400);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Fake {
    fake: FakeDingTalk,
    base: String,
    http: reqwest::Client,
}

async fn start() -> Fake {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    fake.set_credentials(APP_KEY, APP_SECRET);
    Fake {
        fake,
        base,
        http: reqwest::Client::new(),
    }
}

fn open_body(subscriptions: Value) -> Value {
    json!({"clientId": APP_KEY, "clientSecret": APP_SECRET, "subscriptions": subscriptions,
           "ua": "stream-test/1.0", "localIp": "10.0.0.5"})
}

fn events_only() -> Value {
    json!([{"type": "EVENT", "topic": "*"}])
}

fn events_and_robot() -> Value {
    json!([{"type": "EVENT", "topic": "*"}, {"type": "CALLBACK", "topic": ROBOT_TOPIC},
           {"type": "SYSTEM", "topic": "ping"}, {"type": "SYSTEM", "topic": "disconnect"}])
}

impl Fake {
    async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        // No Content-Type on purpose: `curl -d` does not send a JSON one either.
        let response = self
            .http
            .post(format!("{}{route}", self.base))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self, route: &str, body: Value) -> Value {
        let (status, answer) = self.post(&format!("/_fake/stream{route}"), body).await;
        assert_eq!(status, 200, "{route}: {answer}");
        answer
    }

    async fn state(&self) -> Value {
        let url = format!("{}/_fake/stream/state", self.base);
        let response = self.http.get(url).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// Polls the state until `check` holds (5 s at most).
    async fn state_when(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + COMES;
        loop {
            let state = self.state().await;
            if check(&state) {
                return state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "state never showed {what}: {state:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn open(&self, body: Value) -> (u16, Value) {
        self.post("/v1.0/gateway/connections/open", body).await
    }

    async fn ticket(&self, subscriptions: Value) -> String {
        let (status, answer) = self.open(open_body(subscriptions)).await;
        assert_eq!(status, 200, "{answer}");
        let endpoint = answer["endpoint"].as_str().unwrap();
        let ticket = answer["ticket"].as_str().unwrap();
        format!("{endpoint}?ticket={ticket}")
    }

    async fn connect(&self, subscriptions: Value) -> Ws {
        let url = self.ticket(subscriptions).await;
        let (ws, response) = connect_async(url).await.unwrap();
        assert_eq!(response.status().as_u16(), 101);
        ws
    }

    /// The id of the newest connection.
    async fn last_connection(&self) -> u64 {
        let state = self.state().await;
        state["connections"].as_array().unwrap().last().unwrap()["id"]
            .as_u64()
            .unwrap()
    }
}

/// The handshake status of a refused connect.
async fn refused(url: &str) -> u16 {
    match connect_async(url).await {
        Ok(_) => panic!("{url} was accepted"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The next text frame, parsed (WebSocket pings and pongs skipped).
async fn next_frame(ws: &mut Ws) -> Value {
    let frame = tokio::time::timeout(COMES, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a frame within 5 s");
    serde_json::from_str(&frame).unwrap()
}

/// Asserts no text frame arrives for a while.
async fn no_frame(ws: &mut Ws) {
    match tokio::time::timeout(QUIET, ws.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
        Ok(other) => panic!("expected nothing, got {other:?}"),
    }
}

fn data_of(frame: &Value) -> Value {
    serde_json::from_str(frame["data"].as_str().expect("data is a string")).unwrap()
}

fn message_id(frame: &Value) -> String {
    frame["headers"]["messageId"].as_str().unwrap().to_owned()
}

fn event_id(frame: &Value) -> String {
    frame["headers"]["eventId"].as_str().unwrap().to_owned()
}

/// An ack as the official SDKs write it.
async fn ack(ws: &mut Ws, frame: &Value, code: u16, data: Value) {
    let ack = json!({"code": code, "message": "OK", "data": data.to_string(),
        "headers": {"contentType": "application/json", "messageId": message_id(frame)}});
    ws.send(Message::text(ack.to_string())).await.unwrap();
}

async fn ack_status(ws: &mut Ws, frame: &Value, status: &str) {
    ack(ws, frame, 200, json!({"status": status, "message": "ok"})).await;
}

#[tokio::test]
async fn connections_open_checks_credentials_and_body() {
    let t = start().await;
    let (status, answer) = t.open(open_body(events_and_robot())).await;
    assert_eq!(status, 200, "{answer}");
    let endpoint = answer["endpoint"].as_str().unwrap();
    let port = t.base.rsplit(':').next().unwrap();
    assert_eq!(endpoint, format!("ws://127.0.0.1:{port}/connect"));
    assert_eq!(answer["ticket"].as_str().unwrap().len(), 36);

    let mut wrong = open_body(events_only());
    wrong["clientSecret"] = json!("not-the-secret");
    let (status, answer) = t.open(wrong).await;
    assert_eq!(status, 401);
    assert_eq!(answer["code"], "authFailed");
    assert_eq!(answer["message"], "鉴权失败");
    assert!(answer["requestid"].is_string());

    let mut no_subscriptions = open_body(events_only());
    no_subscriptions
        .as_object_mut()
        .unwrap()
        .remove("subscriptions");
    assert_eq!(t.open(no_subscriptions).await.0, 400);
    assert_eq!(
        t.open(open_body(
            json!([{"type": "EVENT", "topic": "user_add_org"}])
        ))
        .await
        .0,
        400
    );
    assert_eq!(t.open(json!("clientId=x")).await.0, 400);
    let get = t
        .http
        .get(format!("{}{}", t.base, fake_dingtalk::OPEN_PATH));
    assert_eq!(get.send().await.unwrap().status().as_u16(), 405);

    // A fault scripted on the path applies to it; faults without a path do not.
    t.post(
        "/_fake/faults",
        json!({"path": fake_dingtalk::OPEN_PATH, "status": 503}),
    )
    .await;
    assert_eq!(t.open(open_body(events_only())).await.0, 503);
    t.post("/_fake/faults", json!({"errcode": 90018})).await;
    assert_eq!(t.open(open_body(events_only())).await.0, 200);

    let state = t.state().await;
    assert_eq!(state["tickets_issued"], 2);
    assert_eq!(state["opens_refused"], 1);
    assert_eq!(state["opens_malformed"], 3);
    assert_eq!(t.fake.calls_to(fake_dingtalk::OPEN_PATH).len(), 8);
}

#[tokio::test]
async fn tickets_are_one_shot_and_expire() {
    let t = start().await;
    let url = t.ticket(events_only()).await;
    // A plain GET (no handshake) is refused and does not use the ticket.
    let plain = t.http.get(url.replace("ws://", "http://")).send().await;
    assert!(plain.unwrap().status().is_client_error());
    let (ws, _) = connect_async(url.as_str()).await.unwrap();
    assert_eq!(refused(&url).await, 401, "a ticket serves once");
    let unknown = url.split('?').next().unwrap().to_owned() + "?ticket=nope";
    assert_eq!(refused(&unknown).await, 401);
    assert_eq!(refused(url.split('?').next().unwrap()).await, 400);

    t.admin("/settings", json!({"ticket_ttl_ms": 100})).await;
    let stale = t.ticket(events_only()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refused(&stale).await, 401, "an expired ticket");

    let state = t.state().await;
    assert_eq!(state["tickets_issued"], 2);
    assert_eq!(
        state["tickets_refused"],
        json!({"used": 1, "unknown": 1, "missing": 1, "expired": 1})
    );
    assert_eq!(state["open_connections"], 1);
    let connection = &state["connections"][0];
    assert_eq!(connection["ua"], "stream-test/1.0");
    assert_eq!(connection["local_ip"], "10.0.0.5");
    assert_eq!(connection["client_id"], APP_KEY);
    assert_eq!(connection["subscriptions"], events_only());
    assert_eq!(connection["state"], "open");
    drop(ws);
    t.state_when("the connection closed", |s| s["open_connections"] == 0)
        .await;
}

#[tokio::test]
async fn an_event_frame_is_what_the_sdks_read_and_success_is_recorded() {
    let t = start().await;
    let mut ws = t.connect(events_only()).await;
    let queued = t
        .admin(
            "/events",
            json!([{"eventType": "user_add_org", "eventId": "ev-1", "corpId": "dingcorp1",
                    "eventBornTime": 1683533823336_i64, "data": {"userId": ["u1"], "n": 1}}]),
        )
        .await;
    assert_eq!(queued["event_ids"], json!(["ev-1"]));

    let frame = next_frame(&mut ws).await;
    assert_eq!(frame["specVersion"], "1.0");
    assert_eq!(frame["type"], "EVENT");
    let headers = frame["headers"].as_object().unwrap();
    for name in [
        "topic",
        "messageId",
        "contentType",
        "time",
        "eventType",
        "eventId",
        "eventCorpId",
        "eventBornTime",
        "eventUnifiedAppId",
    ] {
        assert!(headers[name].is_string(), "{name} is a string: {frame}");
    }
    assert_eq!(headers["topic"], "*");
    assert_eq!(headers["contentType"], "application/json");
    assert_eq!(headers["eventType"], "user_add_org");
    assert_eq!(headers["eventId"], "ev-1");
    assert_eq!(headers["eventCorpId"], "dingcorp1");
    assert_eq!(headers["eventBornTime"], "1683533823336");
    assert!(headers["time"].as_str().unwrap().parse::<i64>().unwrap() > 1_600_000_000_000);
    assert_eq!(data_of(&frame), json!({"userId": ["u1"], "n": 1}));

    ack_status(&mut ws, &frame, "SUCCESS").await;
    let state = t
        .state_when("the SUCCESS ack", |s| s["acks"]["SUCCESS"] == 1)
        .await;
    assert_eq!(state["acked_event_ids"], json!(["ev-1"]));
    assert_eq!(state["in_flight"], 0);
    assert_eq!(state["queued"], 0);
    assert_eq!(state["bad_ack_count"], 0);
    let frames = state["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["message_id"], message_id(&frame));
    assert_eq!(frames[0]["event_id"], "ev-1");
    assert_eq!(frames[0]["attempt"], 1);
    assert_eq!(frames[0]["type"], "EVENT");
    assert_eq!(t.fake.stream_acked_event_ids().len(), 1);

    // Extra headers, a removed header, and a data string sent verbatim.
    let mut odd = StreamEvent::new("bpms_task_change", "ev-2", json!({}));
    odd.headers.insert("x-extra".into(), json!(42));
    odd.headers.insert("eventUnifiedAppId".into(), Value::Null);
    odd.raw_data = Some("not json".into());
    t.fake.stream_push_events(vec![odd]).unwrap();
    let frame = next_frame(&mut ws).await;
    assert_eq!(frame["headers"]["x-extra"], "42");
    assert!(frame["headers"].get("eventUnifiedAppId").is_none());
    assert_eq!(frame["data"], "not json");
}

#[tokio::test]
async fn later_is_delivered_again_with_a_new_message_id() {
    let t = start().await;
    t.admin("/settings", json!({"redelivery_delay_ms": 50}))
        .await;
    let mut ws = t.connect(events_only()).await;
    t.fake
        .stream_push_events(vec![StreamEvent::new(
            "user_add_org",
            "ev-later",
            json!({}),
        )])
        .unwrap();
    let first = next_frame(&mut ws).await;
    ack_status(&mut ws, &first, "LATER").await;
    let second = next_frame(&mut ws).await;
    assert_eq!(event_id(&second), "ev-later");
    assert_ne!(message_id(&second), message_id(&first));
    // The Go SDK's LATER: code 500.
    ack(&mut ws, &second, 500, json!({"status": "LATER"})).await;
    let third = next_frame(&mut ws).await;
    assert_eq!(event_id(&third), "ev-later");
    ack_status(&mut ws, &third, "SUCCESS").await;

    let state = t
        .state_when("the SUCCESS ack", |s| s["acks"]["SUCCESS"] == 1)
        .await;
    assert_eq!(state["acks"]["LATER"], 2);
    assert_eq!(state["redeliveries"], 2);
    let attempts: Vec<&Value> = state["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["attempt"])
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(state["acked_event_ids"], json!(["ev-later"]));
    no_frame(&mut ws).await;
}

#[tokio::test]
async fn an_unacknowledged_frame_times_out_and_comes_again() {
    let t = start().await;
    t.admin(
        "/settings",
        json!({"ack_timeout_ms": 300, "redelivery_delay_ms": 0}),
    )
    .await;
    let mut ws = t.connect(events_only()).await;
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-slow"}),
    )
    .await;
    let first = next_frame(&mut ws).await;
    let second = next_frame(&mut ws).await;
    assert_eq!(event_id(&second), "ev-slow");
    assert_ne!(message_id(&second), message_id(&first));
    // The first one's ack comes late: counted, and its SUCCESS is the client's word.
    ack_status(&mut ws, &first, "SUCCESS").await;
    ack_status(&mut ws, &second, "SUCCESS").await;
    let state = t
        .state_when("both acks", |s| s["acks"]["SUCCESS"] == 2)
        .await;
    assert_eq!(state["ack_timeouts"], 1);
    assert_eq!(state["late_acks"], 1);
    assert_eq!(state["acked_event_ids"], json!(["ev-slow"]));
}

#[tokio::test]
async fn a_frame_in_flight_on_a_dropped_connection_comes_again_on_another() {
    let t = start().await;
    t.admin("/settings", json!({"redelivery_delay_ms": 0}))
        .await;
    let mut a = t.connect(events_only()).await;
    let a_id = t.last_connection().await;
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-drop"}),
    )
    .await;
    let on_a = next_frame(&mut a).await;
    let mut b = t.connect(events_only()).await;

    let dropped = t.admin("/drop", json!({"connection": a_id})).await;
    assert_eq!(dropped["connections"], json!([a_id]));
    // No close frame: the socket just ends.
    let end = tokio::time::timeout(COMES, a.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Close(_)))),
        "a drop sends no close frame: {end:?}"
    );

    let on_b = next_frame(&mut b).await;
    assert_eq!(event_id(&on_b), "ev-drop");
    assert_ne!(message_id(&on_b), message_id(&on_a));
    ack_status(&mut b, &on_b, "SUCCESS").await;
    let state = t
        .state_when("the ack on b", |s| s["acks"]["SUCCESS"] == 1)
        .await;
    assert_eq!(state["redeliveries"], 1);
    let a_record = &state["connections"][0];
    assert_eq!(a_record["state"], "closed");
    assert!(a_record["close_reason"]
        .as_str()
        .unwrap()
        .starts_with("dropped by the fake"));
    assert_eq!(state["frames"][1]["attempt"], 2);

    // The client closing mid-flight does the same.
    t.fake
        .stream_push_events(vec![StreamEvent::new(
            "user_add_org",
            "ev-close",
            json!({}),
        )])
        .unwrap();
    let on_b = next_frame(&mut b).await;
    assert_eq!(event_id(&on_b), "ev-close");
    b.close(None).await.unwrap();
    let mut c = t.connect(events_only()).await;
    let on_c = next_frame(&mut c).await;
    assert_eq!(event_id(&on_c), "ev-close");
    assert_ne!(message_id(&on_c), message_id(&on_b));
}

#[tokio::test]
async fn the_window_bounds_unacknowledged_frames() {
    let t = start().await;
    t.admin("/settings", json!({"window": 2})).await;
    let mut ws = t.connect(events_only()).await;
    let generated = t
        .admin("/events/generate", json!({"count": 5, "id_prefix": "w-"}))
        .await;
    assert_eq!(generated["queued"], 5);
    let one = next_frame(&mut ws).await;
    let two = next_frame(&mut ws).await;
    assert_eq!([event_id(&one), event_id(&two)], ["w-1", "w-2"]);
    no_frame(&mut ws).await;
    assert_eq!(t.state().await["queued"], 3);
    ack_status(&mut ws, &one, "SUCCESS").await;
    let three = next_frame(&mut ws).await;
    assert_eq!(event_id(&three), "w-3");
    no_frame(&mut ws).await;
}

#[tokio::test]
async fn two_connections_share_the_queue() {
    let t = start().await;
    let mut a = t.connect(events_only()).await;
    let mut b = t.connect(events_only()).await;
    t.admin("/events/generate", json!({"count": 10, "id_prefix": "s-"}))
        .await;
    let mut seen = Vec::new();
    for ws in [&mut a, &mut b] {
        for _ in 0..5 {
            let frame = next_frame(ws).await;
            seen.push(event_id(&frame));
            ack_status(ws, &frame, "SUCCESS").await;
        }
        no_frame(ws).await;
    }
    seen.sort();
    let mut expected: Vec<String> = (1..=10).map(|i| format!("s-{i}")).collect();
    expected.sort();
    assert_eq!(seen, expected, "each event went to one connection");
    let state = t
        .state_when("ten acks", |s| s["acks"]["SUCCESS"] == 10)
        .await;
    assert_eq!(state["acked_event_ids"].as_array().unwrap().len(), 10);
    for connection in state["connections"].as_array().unwrap() {
        assert_eq!(connection["frames_sent"], 5);
    }
}

#[tokio::test]
async fn pings_must_be_echoed_with_the_same_data() {
    let t = start().await;
    let mut ws = t.connect(events_and_robot()).await;
    let sent = t.admin("/ping", json!({})).await;
    assert_eq!(sent["message_ids"].as_array().unwrap().len(), 1);
    let ping = next_frame(&mut ws).await;
    assert_eq!(ping["type"], "SYSTEM");
    assert_eq!(ping["headers"]["topic"], "ping");
    assert!(data_of(&ping)["opaque"].is_string());
    // The echo: code 200, same messageId, the same data string.
    let echo =
        json!({"code": 200, "headers": ping["headers"], "message": "OK", "data": ping["data"]});
    ws.send(Message::text(echo.to_string())).await.unwrap();
    t.state_when("the echo", |s| s["pings_echoed"] == 1).await;

    t.fake.stream_ping(None);
    let ping = next_frame(&mut ws).await;
    let wrong = json!({"code": 200, "headers": ping["headers"], "message": "OK", "data": "{}"});
    ws.send(Message::text(wrong.to_string())).await.unwrap();
    let state = t
        .state_when("the bad echo", |s| s["bad_ack_count"] == 1)
        .await;
    assert_eq!(state["pings_echoed"], 1);
    assert_eq!(state["pings_sent"], 2);
    assert_eq!(state["system_acks"]["ping"], 2);
    assert!(state["bad_acks"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("ping"));

    // Periodic pings, unasked.
    let mut settings = t.fake.stream_settings();
    settings.ping_interval_ms = 100;
    t.fake.set_stream_settings(settings);
    for _ in 0..2 {
        let ping = next_frame(&mut ws).await;
        assert_eq!(ping["headers"]["topic"], "ping");
        let echo =
            json!({"code": 200, "headers": ping["headers"], "message": "OK", "data": ping["data"]});
        ws.send(Message::text(echo.to_string())).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + COMES;
    while t.fake.stream_report().pings_echoed < 3 {
        assert!(tokio::time::Instant::now() < deadline, "echoes recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn disconnect_then_the_socket_closes_after_the_delay() {
    let t = start().await;
    let mut ws = t.connect(events_only()).await;
    let told = t
        .admin(
            "/disconnect",
            json!({"reason": "rebalance", "close_after_ms": 400}),
        )
        .await;
    assert_eq!(told["connections"].as_array().unwrap().len(), 1);
    let started = std::time::Instant::now();
    let frame = next_frame(&mut ws).await;
    assert_eq!(frame["type"], "SYSTEM");
    assert_eq!(frame["headers"]["topic"], "disconnect");
    assert_eq!(data_of(&frame), json!({"reason": "rebalance"}));
    // Nothing new goes to a connection told to go.
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-after"}),
    )
    .await;
    let closing = tokio::time::timeout(COMES, ws.next()).await.unwrap();
    match closing {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    let state = t.state_when("closed", |s| s["open_connections"] == 0).await;
    assert_eq!(
        state["connections"][0]["close_reason"],
        "closed by the fake after disconnect"
    );
    assert_eq!(state["queued"], 1);
    let mut next = t.connect(events_only()).await;
    assert_eq!(event_id(&next_frame(&mut next).await), "ev-after");
}

#[tokio::test]
async fn robot_messages_arrive_as_callback_frames() {
    let t = start().await;
    let mut events = t.connect(events_only()).await;
    let queued = t
        .admin(
            "/robot",
            json!({"msgId": "msg-1", "text": {"content": "@bot ack"}, "conversationId": "cid-war-room"}),
        )
        .await;
    assert_eq!(queued["msg_ids"], json!(["msg-1"]));
    no_frame(&mut events).await;
    assert_eq!(t.state().await["queued"], 1, "no robot subscriber yet");

    let mut robot = t.connect(events_and_robot()).await;
    let frame = next_frame(&mut robot).await;
    assert_eq!(frame["type"], "CALLBACK");
    assert_eq!(frame["headers"]["topic"], ROBOT_TOPIC);
    assert!(frame["headers"]["messageId"].is_string());
    let message = data_of(&frame);
    assert_eq!(message["msgId"], "msg-1");
    assert_eq!(message["text"]["content"], "@bot ack");
    assert_eq!(message["conversationId"], "cid-war-room");
    assert_eq!(message["msgtype"], "text");
    assert!(message["senderStaffId"].is_string());
    ack(&mut robot, &frame, 200, json!({"response": null})).await;
    let state = t
        .state_when("the callback ack", |s| s["acks"]["CALLBACK"] == 1)
        .await;
    assert_eq!(state["acked_callback_ids"], json!(["msg-1"]));

    // Fire-and-forget: a robot message lost with its connection is not delivered again.
    t.fake
        .stream_push_robot(vec![json!({"msgId": "msg-2"})])
        .unwrap();
    let frame = next_frame(&mut robot).await;
    assert_eq!(data_of(&frame)["msgId"], "msg-2");
    drop(robot);
    t.state_when("the lost callback", |s| s["lost_callbacks"] == 1)
        .await;
    assert_eq!(t.state().await["queued"], 0);
}

#[tokio::test]
async fn acknowledged_events_can_be_delivered_again() {
    let t = start().await;
    t.admin("/settings", json!({"duplicate_every": 1})).await;
    let mut ws = t.connect(events_only()).await;
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-dup"}),
    )
    .await;
    let first = next_frame(&mut ws).await;
    ack_status(&mut ws, &first, "SUCCESS").await;
    let again = next_frame(&mut ws).await;
    assert_eq!(event_id(&again), "ev-dup");
    assert_ne!(message_id(&again), message_id(&first));
    ack_status(&mut ws, &again, "SUCCESS").await;
    no_frame(&mut ws).await;

    t.admin("/settings", json!({"duplicate_every": 0})).await;
    let asked = t
        .admin(
            "/duplicate",
            json!({"event_ids": ["ev-dup", "never-acked"]}),
        )
        .await;
    assert_eq!(asked["queued"], 1);
    assert_eq!(asked["unknown"], json!(["never-acked"]));
    let third = next_frame(&mut ws).await;
    assert_eq!(event_id(&third), "ev-dup");
    ack_status(&mut ws, &third, "SUCCESS").await;
    let state = t
        .state_when("three acks", |s| s["acks"]["SUCCESS"] == 3)
        .await;
    assert_eq!(state["duplicates_sent"], 2);
    let duplicates: Vec<&Value> = state["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["duplicate"])
        .collect();
    assert_eq!(duplicates, [false, true, true]);
}

#[tokio::test]
async fn a_silent_connection_answers_no_ping_and_sends_nothing() {
    let t = start().await;
    let mut ws = t.connect(events_only()).await;
    t.admin("/silence", json!({"on": true})).await;
    t.state_when("silent", |s| s["connections"][0]["state"] == "silent")
        .await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-quiet"}),
    )
    .await;
    match tokio::time::timeout(QUIET, ws.next()).await {
        Err(_) => {}
        Ok(other) => panic!("a silent fake sent {other:?}"),
    }
    t.admin("/silence", json!({"on": false})).await;
    // Both come once the silence ends: the queued event and the pong, in either order.
    let (mut pong, mut text) = (None, None);
    tokio::time::timeout(COMES, async {
        while pong.is_none() || text.is_none() {
            match ws.next().await {
                Some(Ok(Message::Pong(payload))) => pong = Some(payload.to_vec()),
                Some(Ok(Message::Text(t))) => text = Some(t.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("a pong and the event after the silence");
    assert_eq!(pong.unwrap(), b"are you there");
    let frame: Value = serde_json::from_str(&text.unwrap()).unwrap();
    assert_eq!(event_id(&frame), "ev-quiet");

    // A silence with a duration ends by itself.
    t.admin("/silence", json!({"on": true, "ms": 200})).await;
    t.state_when("silent", |s| s["connections"][0]["state"] == "silent")
        .await;
    t.state_when("speaking again", |s| s["connections"][0]["state"] == "open")
        .await;
}

#[tokio::test]
async fn bad_acks_are_recorded_and_raw_frames_sent_as_is() {
    let t = start().await;
    t.admin("/settings", json!({"ack_timeout_ms": 60_000}))
        .await;
    let mut ws = t.connect(events_only()).await;
    t.admin(
        "/events",
        json!({"eventType": "user_add_org", "eventId": "ev-bad"}),
    )
    .await;
    let frame = next_frame(&mut ws).await;
    ws.send(Message::text("not json")).await.unwrap();
    let object_data = json!({"code": 200, "headers": {"messageId": message_id(&frame)},
                             "data": {"status": "SUCCESS"}});
    ws.send(Message::text(object_data.to_string()))
        .await
        .unwrap();
    let unknown = json!({"code": 200, "headers": {"messageId": "nope"},
                         "data": "{\"status\":\"SUCCESS\"}"});
    ws.send(Message::text(unknown.to_string())).await.unwrap();
    let state = t
        .state_when("3 bad acks", |s| s["bad_ack_count"] == 3)
        .await;
    let reasons: Vec<&str> = state["bad_acks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].starts_with("not JSON"), "{reasons:?}");
    assert!(reasons[1].contains("JSON string"), "{reasons:?}");
    assert!(reasons[2].contains("unknown"), "{reasons:?}");
    // Still in flight: a bad ack is no ack.
    assert_eq!(state["in_flight"], 1);
    assert!(state["acked_event_ids"].as_array().unwrap().is_empty());

    t.admin("/raw", json!({"text": "{\"type\": \"MYSTERY\"}"}))
        .await;
    assert_eq!(next_frame(&mut ws).await, json!({"type": "MYSTERY"}));
    let sent = t
        .admin(
            "/system",
            json!({"topic": "future_topic", "data": {"x": 1}}),
        )
        .await;
    let system = next_frame(&mut ws).await;
    assert_eq!(system["headers"]["topic"], "future_topic");
    assert_eq!(
        message_id(&system),
        sent["message_ids"][0].as_str().unwrap()
    );
    ack(&mut ws, &system, 200, json!({})).await;
    t.state_when("the unknown SYSTEM topic acked", |s| {
        s["system_acks"]["future_topic"] == 1
    })
    .await;
    let (status, _) = t
        .post("/_fake/stream/drop", json!({"connection": 999}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = t.post("/_fake/stream/settings", json!({"windw": 3})).await;
    assert_eq!(status, 400, "unknown settings are refused");
}

#[tokio::test]
async fn a_reset_ends_the_connections() {
    let t = start().await;
    let mut ws = t.connect(events_only()).await;
    let (status, _) = t.post("/_fake/reset", json!(null)).await;
    assert_eq!(status, 200);
    let end = tokio::time::timeout(COMES, ws.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "the socket ends: {end:?}"
    );
    assert_eq!(t.state().await["connections"], json!([]));
}
