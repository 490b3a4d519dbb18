//! The broker destinations against real brokers: NATS with JetStream, RabbitMQ and Redis at
//! the URLs in `DINGHOOK_TEST_NATS_URL`, `DINGHOOK_TEST_AMQP_URL` and
//! `DINGHOOK_TEST_REDIS_URL` (a test whose variable is unset prints SKIPPED and passes).
//!
//! Each test makes its own stream, exchange and queue, or keys, under a unique name and removes
//! them at the end; routes are built from `[[routes]]` tables as a user writes them, and what
//! they delivered is read back with the broker's own client, not through dinghook. A relay
//! between route and broker, stopped and started again, plays the broker going away and coming
//! back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dinghook::routes::config::{resolve, RouteConfig};
use dinghook::routes::destination::{DeliveryError, Destination, Message};
use dinghook::routes::envelope::{Envelope, EventParts};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const NATS: &str = "DINGHOOK_TEST_NATS_URL";
const AMQP: &str = "DINGHOOK_TEST_AMQP_URL";
const REDIS: &str = "DINGHOOK_TEST_REDIS_URL";

/// Every route here waits this long at most for its broker.
const TIMEOUT: Duration = Duration::from_secs(3);

fn broker_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIPPED: {var} is not set");
            None
        }
    }
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The destination of one `[[routes]]` table.
fn route(table: &str) -> Arc<dyn Destination> {
    #[derive(serde::Deserialize)]
    struct File {
        routes: Vec<RouteConfig>,
    }
    let text = format!("[[routes]]\nname = \"r\"\ntimeout = \"3s\"\n{table}\n");
    let file: File = toml::from_str(&text).unwrap();
    let routes = resolve(&file.routes, &["default", "ops"]).unwrap();
    dinghook::routes::destination(&routes.specs[0]).unwrap()
}

/// What the dispatcher hands a route for an event of `event_type` that came to `app`.
fn message(app: &str, event_type: &str, event_id: &str) -> Message {
    let payload = format!(r#"{{"EventType":"{event_type}","eventId":"{event_id}"}}"#);
    let envelope = Envelope::new(&EventParts {
        app,
        dedup_key: event_id,
        event_type,
        corp_id: Some("ding0001"),
        received_at: 1_767_225_600_000,
        source: "push",
        payload: &payload,
    })
    .unwrap();
    Message {
        id: envelope.id.clone(),
        app: app.to_owned(),
        event_type: event_type.to_owned(),
        body: envelope.to_json(),
    }
}

/// The error of a delivery that must be retried, within the route's timeout (and a little).
async fn retried(route: &dyn Destination, message: &Message) -> String {
    let started = Instant::now();
    let outcome = route.deliver(message).await;
    let took = started.elapsed();
    assert!(took < TIMEOUT + Duration::from_millis(500), "took {took:?}");
    match outcome {
        Err(DeliveryError::Retry { message, .. }) => {
            eprintln!("retry after {took:?}: {message}");
            message
        }
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// A TCP relay to a broker on a port of its own: stopped, it closes every connection through
/// it and listens no more (the broker is gone); started, it relays again.
struct Relay {
    port: u16,
    broker: String,
    /// The accept loop and every relayed connection, aborted by `stop`.
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    /// A relay to the broker of `url` (`default_port` when the URL names none), not started:
    /// nothing listens on its port yet.
    fn new(url: &str, default_port: u16) -> Relay {
        let url = reqwest::Url::parse(url).unwrap();
        let broker = format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port().unwrap_or(default_port)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Relay {
            port,
            broker,
            tasks: Arc::default(),
        }
    }

    /// `url` with the relay in place of the broker.
    fn url(&self, url: &str) -> String {
        let mut url = reqwest::Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    async fn start(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let broker = self.broker.clone();
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let broker = broker.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(relay.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Refused while nothing listens, within the timeout and without the URL's password; delivered
/// once the broker can be reached; refused while it is gone again; delivered after it is back,
/// by the same route each time. `delivered` reads the broker and counts what arrived.
async fn goes_away_and_comes_back<F, Fut>(
    url: &str,
    default_port: u16,
    table: impl Fn(&str) -> String,
    delivered: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let relay = Relay::new(url, default_port);
    let relayed = relay.url(url);
    let route = route(&table(&relayed));
    let password = reqwest::Url::parse(url)
        .unwrap()
        .password()
        .map(str::to_owned);

    let error = retried(route.as_ref(), &message("ops", "chat_update_title", "a1")).await;
    if let Some(password) = &password {
        assert!(!error.contains(password.as_str()), "{error}");
    }
    assert!(route.check().await.is_err());

    relay.start().await;
    route
        .deliver(&message("ops", "chat_update_title", "a2"))
        .await
        .unwrap();
    route.check().await.unwrap();
    assert_eq!(delivered().await, 1);

    relay.stop();
    retried(route.as_ref(), &message("ops", "chat_update_title", "a3")).await;

    relay.start().await;
    route
        .deliver(&message("ops", "chat_update_title", "a4"))
        .await
        .unwrap();
    assert_eq!(delivered().await, 2);
}

/// A broker that takes the connection and never says a word (the kernel completes the TCP
/// handshake from the backlog; nothing reads or writes): each kind of route gives up within
/// its timeout, deliveries and checks alike. Needs no broker.
#[tokio::test]
async fn a_broker_that_never_answers_is_given_up_on_within_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let tables = [
        format!("url = \"nats://u:hunter2@127.0.0.1:{port}\"\nsubject = \"s.{{app}}\""),
        format!("url = \"amqp://u:hunter2@127.0.0.1:{port}/%2f\"\nexchange = \"x\""),
        format!("url = \"redis://:hunter2@127.0.0.1:{port}\"\nstream = \"s\""),
    ];
    let sent = message("ops", "chat_update_title", "e1");
    let waits = tables.iter().map(|table| {
        let route = route(table);
        let sent = &sent;
        async move {
            let started = Instant::now();
            let error = retried(route.as_ref(), sent).await;
            assert!(started.elapsed() >= TIMEOUT - Duration::from_millis(100));
            assert!(!error.contains("hunter2"), "{error}");
            let started = Instant::now();
            let error = route.check().await.unwrap_err();
            assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500));
            assert!(!error.contains("hunter2"), "{error}");
        }
    });
    futures_util::future::join_all(waits).await;
    drop(silent);
}

mod jetstream {
    use super::*;
    use async_nats::jetstream::stream::{Config, StorageType};
    use async_nats::jetstream::Context;

    async fn broker(url: &str) -> Context {
        async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
    }

    /// A stream in memory that takes `<name>.>`.
    async fn stream(js: &Context, name: &str) {
        js.create_stream(Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::Memory,
            ..Config::default()
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn messages_are_acked_with_their_sequence_and_stored_once_per_id() {
        let Some(url) = broker_url(NATS) else { return };
        let js = broker(&url).await;
        let name = unique("dinghook_test");
        stream(&js, &name).await;
        let route = route(&format!(
            "url = \"{url}\"\nsubject = \"{name}.{{app}}.{{type}}\""
        ));
        let first = message("ops", "chat_update_title", "e1");
        let second = message("default", "todo_task_create", "e2");

        let one = route.deliver(&first).await.unwrap();
        let two = route.deliver(&second).await.unwrap();
        // A redelivery inside the duplicate window: acknowledged, not stored again.
        let again = route.deliver(&first).await.unwrap();
        assert_eq!(one.receipt.as_deref(), Some("1"));
        assert_eq!(two.receipt.as_deref(), Some("2"));
        assert_eq!(again.receipt.as_deref(), Some("1"));

        let mut stored = js.get_stream(&name).await.unwrap();
        assert_eq!(stored.info().await.unwrap().state.messages, 2);
        for (sequence, sent, subject) in [
            (1, &first, format!("{name}.ops.chat_update_title")),
            (2, &second, format!("{name}.default.todo_task_create")),
        ] {
            let got = stored.get_raw_message(sequence).await.unwrap();
            assert_eq!(got.subject.as_str(), subject);
            assert_eq!(got.payload.as_ref(), sent.body.as_slice());
            let header = |key: &str| got.headers.get(key).map(|v| v.as_str().to_owned());
            assert_eq!(header("Nats-Msg-Id").as_deref(), Some(sent.id.as_str()));
            assert_eq!(header("Dinghook-App").as_deref(), Some(sent.app.as_str()));
            assert_eq!(
                header("Dinghook-Type").as_deref(),
                Some(sent.event_type.as_str())
            );
        }
        route.check().await.unwrap();
        js.delete_stream(&name).await.unwrap();
    }

    #[tokio::test]
    async fn a_subject_no_stream_takes_is_retried_saying_so() {
        let Some(url) = broker_url(NATS) else { return };
        let name = unique("dinghook_test");
        let route = route(&format!("url = \"{url}\"\nsubject = \"{name}.{{app}}\""));
        let error = retried(route.as_ref(), &message("ops", "chat_update_title", "e1")).await;
        assert!(error.contains("no JetStream stream"), "{error}");
        assert!(error.contains(&format!("{name}.ops")), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_goes_away_and_comes_back() {
        let Some(url) = broker_url(NATS) else { return };
        let js = broker(&url).await;
        let name = unique("dinghook_test");
        stream(&js, &name).await;
        goes_away_and_comes_back(
            &url,
            4222,
            |url| format!("url = \"{url}\"\nsubject = \"{name}.{{app}}.{{type}}\""),
            || async {
                let mut stored = js.get_stream(&name).await.unwrap();
                stored.info().await.unwrap().state.messages as usize
            },
        )
        .await;
        js.delete_stream(&name).await.unwrap();
    }
}

mod amqp {
    use super::*;
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

    /// The test's own connection (kept: its exclusive queues live as long as it does).
    async fn broker(url: &str) -> (Connection, Channel) {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        (connection, channel)
    }

    /// A topic exchange and a queue bound to it for `binding`.
    async fn exchange_and_queue(channel: &Channel, exchange: &str, queue: &str, binding: &str) {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    async fn remove(channel: &Channel, exchange: &str, queue: &str) {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }

    async fn queued(channel: &Channel, queue: &str) -> u32 {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    #[tokio::test]
    async fn messages_are_persistent_confirmed_and_carry_the_id() {
        let Some(url) = broker_url(AMQP) else { return };
        let (_connection, channel) = broker(&url).await;
        let (exchange, queue) = (unique("dinghook_test"), unique("dinghook_test"));
        exchange_and_queue(&channel, &exchange, &queue, "ops.*").await;
        let route = route(&format!(
            "url = \"{url}\"\nexchange = \"{exchange}\"\nrouting_key = \"{{app}}.{{type}}\""
        ));
        route.check().await.unwrap();
        let sent = message("ops", "chat_update_title", "e1");
        route.deliver(&sent).await.unwrap();

        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the message is in the queue");
        assert_eq!(got.data, sent.body);
        assert_eq!(got.exchange.as_str(), exchange);
        assert_eq!(got.routing_key.as_str(), "ops.chat_update_title");
        let p = &got.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(sent.id.as_str())
        );
        let headers = p.headers().clone().unwrap_or_default();
        let header = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        assert_eq!(header("dinghook-app").as_deref(), Some("ops"));
        assert_eq!(
            header("dinghook-type").as_deref(),
            Some("chat_update_title")
        );

        // The queue takes only ops.*: another app's event is returned, and retried.
        let error = retried(
            route.as_ref(),
            &message("default", "chat_update_title", "e2"),
        )
        .await;
        assert!(error.contains("no queue is bound"), "{error}");
        assert!(error.contains("default.chat_update_title"), "{error}");
        // The route goes on publishing after a return.
        route
            .deliver(&message("ops", "todo_task_create", "e3"))
            .await
            .unwrap();
        assert_eq!(queued(&channel, &queue).await, 1);
        remove(&channel, &exchange, &queue).await;
    }

    /// Deliveries in flight at once, half of them unroutable: each is told its own outcome
    /// (a return is never taken for another delivery's), and exactly the routable ones queue.
    #[tokio::test]
    async fn concurrent_deliveries_each_get_their_own_confirm_or_return() {
        let Some(url) = broker_url(AMQP) else { return };
        let (_connection, channel) = broker(&url).await;
        let (exchange, queue) = (unique("dinghook_test"), unique("dinghook_test"));
        exchange_and_queue(&channel, &exchange, &queue, "ops.*").await;
        let route = route(&format!("url = \"{url}\"\nexchange = \"{exchange}\""));
        let sent: Vec<Message> = (0..64)
            .map(|i| {
                let app = if i % 2 == 0 { "ops" } else { "default" };
                message(app, "chat_update_title", &format!("e{i}"))
            })
            .collect();
        let outcomes = futures_util::future::join_all(sent.iter().map(|m| route.deliver(m))).await;
        for (m, outcome) in sent.iter().zip(&outcomes) {
            match (m.app.as_str(), outcome) {
                ("ops", Ok(_)) => {}
                ("default", Err(DeliveryError::Retry { message, .. }))
                    if message.contains("no queue is bound") => {}
                (app, other) => panic!("{app}: {other:?}"),
            }
        }
        let mut queued_ids = Vec::new();
        while let Some(got) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let id = got.properties.message_id().as_ref().map(|s| s.to_string());
            queued_ids.push(id.unwrap_or_default());
        }
        let mut routable: Vec<String> = sent
            .iter()
            .filter(|m| m.app == "ops")
            .map(|m| m.id.clone())
            .collect();
        queued_ids.sort();
        routable.sort();
        assert_eq!(queued_ids, routable);
        remove(&channel, &exchange, &queue).await;
    }

    #[tokio::test]
    async fn a_missing_exchange_is_retried_until_it_is_declared() {
        let Some(url) = broker_url(AMQP) else { return };
        let (_connection, channel) = broker(&url).await;
        let (exchange, queue) = (unique("dinghook_test"), unique("dinghook_test"));
        let route = route(&format!("url = \"{url}\"\nexchange = \"{exchange}\""));
        let error = retried(route.as_ref(), &message("ops", "chat_update_title", "e1")).await;
        assert!(error.contains("no exchange"), "{error}");
        assert!(error.contains(&exchange), "{error}");
        let check = route.check().await.unwrap_err();
        assert!(check.contains("no exchange"), "{check}");

        exchange_and_queue(&channel, &exchange, &queue, "#").await;
        route.check().await.unwrap();
        route
            .deliver(&message("ops", "chat_update_title", "e2"))
            .await
            .unwrap();
        assert_eq!(queued(&channel, &queue).await, 1);
        remove(&channel, &exchange, &queue).await;
    }

    #[tokio::test]
    async fn a_server_that_goes_away_and_comes_back() {
        let Some(url) = broker_url(AMQP) else { return };
        let (_connection, channel) = broker(&url).await;
        let (exchange, queue) = (unique("dinghook_test"), unique("dinghook_test"));
        exchange_and_queue(&channel, &exchange, &queue, "#").await;
        goes_away_and_comes_back(
            &url,
            5672,
            |url| format!("url = \"{url}\"\nexchange = \"{exchange}\""),
            || async { queued(&channel, &queue).await as usize },
        )
        .await;
        remove(&channel, &exchange, &queue).await;
    }
}

mod redis_stream {
    use super::*;
    use redis::aio::MultiplexedConnection;
    use redis::Value;

    async fn broker(url: &str) -> MultiplexedConnection {
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn length(redis: &mut MultiplexedConnection, key: &str) -> usize {
        redis::cmd("XLEN")
            .arg(key)
            .query_async(redis)
            .await
            .unwrap()
    }

    /// The stream's entries: id and fields.
    async fn entries(redis: &mut MultiplexedConnection, key: &str) -> Vec<(String, Vec<Vec<u8>>)> {
        let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(redis)
            .await
            .unwrap();
        reply
    }

    #[tokio::test]
    async fn each_message_is_one_entry_whose_id_is_the_receipt() {
        let Some(url) = broker_url(REDIS) else { return };
        let mut redis = broker(&url).await;
        let prefix = unique("dinghook_test");
        let route = route(&format!("url = \"{url}\"\nstream = \"{prefix}:{{app}}\""));
        let first = message("ops", "chat_update_title", "e1");
        let second = message("ops", "todo_task_create", "e2");
        let other = message("default", "chat_update_title", "e3");
        let mut receipts = Vec::new();
        for sent in [&first, &second, &other] {
            receipts.push(route.deliver(sent).await.unwrap().receipt.unwrap());
        }
        route.check().await.unwrap();

        let ops = entries(&mut redis, &format!("{prefix}:ops")).await;
        let default = entries(&mut redis, &format!("{prefix}:default")).await;
        assert_eq!(ops.len(), 2);
        assert_eq!(default.len(), 1);
        for ((id, fields), (sent, receipt)) in ops
            .iter()
            .chain(&default)
            .zip([&first, &second, &other].into_iter().zip(&receipts))
        {
            assert_eq!(id, receipt);
            let expected: Vec<Vec<u8>> = [
                b"id".to_vec(),
                sent.id.clone().into_bytes(),
                b"app".to_vec(),
                sent.app.clone().into_bytes(),
                b"type".to_vec(),
                sent.event_type.clone().into_bytes(),
                b"envelope".to_vec(),
                sent.body.clone(),
            ]
            .into();
            assert_eq!(fields, &expected);
        }
        let _: Value = redis::cmd("DEL")
            .arg(format!("{prefix}:ops"))
            .arg(format!("{prefix}:default"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn maxlen_trims_the_stream_to_about_that_length() {
        let Some(url) = broker_url(REDIS) else { return };
        let mut redis = broker(&url).await;
        let key = unique("dinghook_test");
        let route = route(&format!("url = \"{url}\"\nstream = \"{key}\"\nmaxlen = 10"));
        for i in 0..300 {
            route
                .deliver(&message("ops", "chat_update_title", &format!("e{i}")))
                .await
                .unwrap();
        }
        // `~`: Redis drops whole nodes of entries (100 by default), never below the length.
        let kept = length(&mut redis, &key).await;
        assert!((10..=110).contains(&kept), "{kept} entries kept");
        let _: Value = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_server_that_goes_away_and_comes_back() {
        let Some(url) = broker_url(REDIS) else { return };
        let key = unique("dinghook_test");
        let counting = url.clone();
        goes_away_and_comes_back(
            &url,
            6379,
            |url| format!("url = \"{url}\"\nstream = \"{key}\""),
            || {
                let (url, key) = (counting.clone(), key.clone());
                async move { length(&mut broker(&url).await, &key).await }
            },
        )
        .await;
        let _: Value = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut broker(&url).await)
            .await
            .unwrap();
    }
}
