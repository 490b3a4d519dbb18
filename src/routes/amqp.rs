//! RabbitMQ (AMQP 0-9-1): the envelope published to the route's exchange with the rendered
//! routing key, persistent, on a channel in publisher-confirm mode; the broker's ack is the
//! confirmation. Published `mandatory`, so a message no queue takes comes back (a return) and
//! is retried instead of being confirmed into nowhere. The route declares nothing: the
//! exchange, queues and bindings are the user's.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
};
use tokio::time::{timeout_at, Instant};

use super::broker::{Redact, Slot};
use super::destination::{Delivered, DeliveryError, Destination, Message};

/// A route to a RabbitMQ exchange.
pub struct Amqp {
    uri: AMQPUri,
    exchange: ShortString,
    /// With `{app}` and `{type}`.
    routing_key: String,
    /// Bounds each delivery and each check, connecting included.
    timeout: Duration,
    redact: Redact,
    /// The connection and its channels, made on the first delivery.
    slot: Slot<Arc<Link>>,
}

/// One connection and its idle channels. Dropping the last `Link` (the slot's and those of
/// deliveries in flight) closes the connection.
struct Link {
    connection: Connection,
    /// Channels in confirm mode with no publish in flight; a delivery takes one (or opens one)
    /// and puts it back after its confirmation. One publish at a time per channel: lapin hands
    /// a returned message to the next confirmation the channel receives, and an ack covering
    /// several publishes (`multiple`) could hand it to another delivery's, which would then be
    /// retried while the unroutable one counted as confirmed. So there are as many channels as
    /// deliveries in flight at once (the route's `concurrency`). A std mutex: held to pop or
    /// push, never across an await.
    idle: Mutex<Vec<Channel>>,
}

impl Link {
    /// An idle channel, or a new one in confirm mode.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match idle {
                Some(channel) if channel.status().connected() => return Ok(channel),
                // Closed by the broker (after a missing exchange) or with the connection.
                Some(_) => continue,
                None => break,
            }
        }
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// `channel` back for the next delivery, unless it closed.
    fn put_back(&self, channel: Channel) {
        if channel.status().connected() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(channel);
        }
    }
}

/// AMQP 0-9-1 persistent delivery mode: the broker writes the message to disk (for a durable
/// queue) before it confirms it.
const PERSISTENT: u8 = 2;

impl Amqp {
    /// Checks the URL and the exchange name; connects to nothing.
    pub fn new(
        url: &str,
        exchange: &str,
        routing_key: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let redact = Redact::new(url);
        let uri = url
            .parse::<AMQPUri>()
            .map_err(|e| redact.text(format!("not an AMQP URL: {e}")))?;
        let exchange = ShortString::try_new(exchange)
            .map_err(|_| "exchange: an AMQP name has at most 255 bytes".to_owned())?;
        Ok(Amqp {
            uri,
            exchange,
            routing_key: routing_key.to_owned(),
            timeout,
            redact,
            slot: Slot::new(),
        })
    }

    /// The shared link, connecting if there is none or its connection closed.
    async fn link(&self, deadline: Instant) -> Result<(u64, Arc<Link>), DeliveryError> {
        let connect = || async {
            let properties =
                ConnectionProperties::default().with_connection_name("dinghook".into());
            let connection = Connection::connect_uri(self.uri.clone(), properties)
                .await
                .map_err(|e| {
                    self.redact
                        .text(format!("could not connect to RabbitMQ: {e}"))
                })?;
            let link = Link {
                connection,
                idle: Mutex::new(Vec::new()),
            };
            // The first channel now, so that a broker refusing confirm mode fails here.
            let channel = link
                .channel()
                .await
                .map_err(|e| self.redact.text(format!("RabbitMQ: {e}")))?;
            link.put_back(channel);
            Ok(Arc::new(link))
        };
        let usable = |link: &Arc<Link>| link.connection.status().connected();
        match timeout_at(deadline, self.slot.get(usable, connect)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(message)) => Err(DeliveryError::retry(message)),
            Err(_) => Err(DeliveryError::retry(format!(
                "could not connect to RabbitMQ within {}",
                crate::time::format_duration(self.timeout)
            ))),
        }
    }

    /// What a failed publish or confirm means. After a missing exchange the broker closed the
    /// channel (dropped with it) and the connection is fine; any other error is the
    /// connection's, and the link goes.
    fn failure(&self, number: u64, error: &lapin::Error) -> DeliveryError {
        if not_found(error) {
            return DeliveryError::retry(self.no_exchange());
        }
        self.slot.drop_failed(number);
        DeliveryError::retry(self.redact.text(format!("RabbitMQ: {error}")))
    }

    fn no_exchange(&self) -> String {
        format!(
            "RabbitMQ has no exchange {:?} in this virtual host: declare it",
            self.exchange.as_str()
        )
    }
}

/// Whether the broker answered 404 (a missing exchange, for a publish or a passive declare).
fn not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

#[async_trait]
impl Destination for Amqp {
    async fn deliver(&self, message: &Message) -> Result<Delivered, DeliveryError> {
        let routing_key = message.render(&self.routing_key);
        let too_long = |what: &str| DeliveryError::Reject {
            message: format!("{what}: an AMQP short string has at most 255 bytes"),
            status: None,
        };
        let routing_key = ShortString::try_new(routing_key.as_str())
            .map_err(|_| too_long(&format!("routing key {routing_key:?}")))?;
        let message_id =
            ShortString::try_new(message.id.as_str()).map_err(|_| too_long("message id"))?;
        let mut headers = FieldTable::default();
        headers.insert(
            "dinghook-app".into(),
            AMQPValue::LongString(LongString::from(message.app.clone())),
        );
        headers.insert(
            "dinghook-type".into(),
            AMQPValue::LongString(LongString::from(message.event_type.clone())),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(message_id)
            .with_app_id("dinghook".into())
            .with_timestamp((crate::time::now_millis() / 1000).max(0) as u64)
            .with_headers(headers);

        let deadline = Instant::now() + self.timeout;
        let (number, link) = self.link(deadline).await?;
        let publish = async {
            let channel = link.channel().await?;
            let confirmation = channel
                .basic_publish(
                    self.exchange.clone(),
                    routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                )
                .await?
                .await?;
            link.put_back(channel);
            Ok::<_, lapin::Error>(confirmation)
        };
        // A channel whose publish failed or timed out is not put back: a late return or
        // confirmation on it must not meet the next delivery's.
        let confirmation = match timeout_at(deadline, publish).await {
            Ok(Ok(confirmation)) => confirmation,
            Ok(Err(error)) => return Err(self.failure(number, &error)),
            Err(_) => {
                self.slot.drop_failed(number);
                return Err(DeliveryError::retry(format!(
                    "no publisher confirm from RabbitMQ within {}",
                    crate::time::format_duration(self.timeout)
                )));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(Delivered::default()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(DeliveryError::retry(format!(
                    "RabbitMQ returned the message ({} {}): no queue is bound to exchange \
                     {:?} for routing key {:?}: bind one",
                    returned.reply_code,
                    returned.reply_text,
                    self.exchange.as_str(),
                    routing_key.as_str()
                )))
            }
            Confirmation::Nack(None) => Err(DeliveryError::retry(
                "RabbitMQ refused the message (a negative publisher confirm)",
            )),
            // Every channel is put in confirm mode before its first publish.
            Confirmation::NotRequested => Err(DeliveryError::retry(
                "RabbitMQ channel without publisher confirms",
            )),
        }
    }

    async fn check(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let (number, link) = self.link(deadline).await.map_err(|e| e.to_string())?;
        if self.exchange.as_str().is_empty() {
            // The default exchange always exists.
            return Ok(());
        }
        // A passive declare that fails closes its channel, so it gets one of its own.
        let probe = async {
            let channel = link.connection.create_channel().await?;
            let declared = channel
                .exchange_declare(
                    self.exchange.clone(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if declared.is_ok() {
                channel.close(200, "".into()).await?;
            }
            declared
        };
        match timeout_at(deadline, probe).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.failure(number, &error).to_string()),
            Err(_) => {
                self.slot.drop_failed(number);
                Err(format!(
                    "RabbitMQ did not answer within {}",
                    crate::time::format_duration(self.timeout)
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_without_the_password() {
        let error = Amqp::new("amqp://u:hunter2@", "x", "k", Duration::from_secs(1))
            .err()
            .unwrap_or_default();
        assert!(error.starts_with("not an AMQP URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let long = "x".repeat(256);
        let error = Amqp::new("amqp://127.0.0.1", &long, "k", Duration::from_secs(1))
            .err()
            .unwrap_or_default();
        assert!(error.starts_with("exchange"), "{error}");
    }
}
