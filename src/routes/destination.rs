//! Where a route sends its messages. Each kind (signed HTTP, NATS JetStream, RabbitMQ, Redis
//! Streams) answers a delivery the same way: confirmed, try again, or never.

use std::time::Duration;

use async_trait::async_trait;

/// One message for a destination: the envelope's JSON and what the destination may address it
/// by.
#[derive(Debug, Clone)]
pub struct Message {
    /// The envelope id: the same on every attempt of the event (Standard Webhooks `webhook-id`,
    /// JetStream `Nats-Msg-Id`, AMQP `message_id`).
    pub id: String,
    pub app: String,
    pub event_type: String,
    /// The envelope, serialized.
    pub body: Vec<u8>,
}

impl Message {
    /// `template` with `{app}` and `{type}` replaced (a subject, routing key or stream name).
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{app}", &self.app)
            .replace("{type}", &self.event_type)
    }
}

/// What the destination confirmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The HTTP status, for HTTP destinations.
    pub status: Option<u16>,
    /// What the destination calls the message (a Redis stream entry id, a JetStream
    /// sequence), when it says.
    pub receipt: Option<String>,
}

/// Why a delivery did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth trying again: a timeout, a refused connection, HTTP 408/429/5xx, a broker
    /// without a confirm. `retry_after` is the destination's own wish (`Retry-After`).
    #[error("{message}")]
    Retry {
        message: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Will not succeed by trying again (HTTP 4xx other than 408/429/410): the delivery is
    /// dead, kept with the status and this message (a body excerpt).
    #[error("{message}")]
    Reject {
        message: String,
        status: Option<u16>,
    },
    /// The destination says it is gone for good (HTTP 410): the route pauses, keeping its
    /// deliveries.
    #[error("{message}")]
    Gone {
        message: String,
        status: Option<u16>,
    },
}

impl DeliveryError {
    pub fn retry(message: impl Into<String>) -> Self {
        DeliveryError::Retry {
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Retry { status, .. }
            | DeliveryError::Reject { status, .. }
            | DeliveryError::Gone { status, .. } => *status,
        }
    }
}

/// A route's destination.
#[async_trait]
pub trait Destination: Send + Sync {
    /// Sends `message` and returns once the destination confirmed it (HTTP 2xx, a JetStream
    /// publish ack, a RabbitMQ publisher confirm, a Redis stream entry id).
    async fn deliver(&self, message: &Message) -> Result<Delivered, DeliveryError>;

    /// Whether the destination can be reached now (for `/readyz` detail and the probe of a
    /// paused route). The default says yes.
    async fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// At most this much of a refusing answer's body is kept with the delivery.
pub const EXCERPT_BYTES: usize = 256;

/// The first [`EXCERPT_BYTES`] of `body`, as text, cut at a character boundary.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    text.trim_end_matches('\u{FFFD}').trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_the_app_and_type() {
        let m = Message {
            id: "evt_1".into(),
            app: "ops".into(),
            event_type: "chat_update_title".into(),
            body: Vec::new(),
        };
        assert_eq!(
            m.render("dinghook.{app}.{type}"),
            "dinghook.ops.chat_update_title"
        );
        assert_eq!(m.render("fixed"), "fixed");
    }

    #[test]
    fn excerpts_are_short_and_whole_characters() {
        let long = "错".repeat(200);
        let e = excerpt(long.as_bytes());
        assert!(
            e.len() <= EXCERPT_BYTES && e.chars().all(|c| c == '错'),
            "{e}"
        );
    }
}
