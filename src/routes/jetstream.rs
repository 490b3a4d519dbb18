//! NATS JetStream: the envelope published to the route's subject with `Nats-Msg-Id` set to the
//! envelope id; JetStream's publish acknowledgement (the stream and its sequence) is the
//! confirmation, and the id lets the stream drop a redelivery within its duplicate window.
//! The route creates no stream: one must take the subject.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::{ConnectOptions, HeaderMap, HeaderValue, ServerAddr};
use async_trait::async_trait;
use tokio::time::{timeout_at, Instant};

use super::broker::{Redact, Slot};
use super::destination::{Delivered, DeliveryError, Destination, Message};

/// A route to a JetStream stream.
pub struct JetStream {
    servers: Vec<ServerAddr>,
    /// With `{app}` and `{type}`.
    subject: String,
    /// Bounds each delivery and each check, connecting included.
    timeout: Duration,
    redact: Redact,
    /// The client (inside its JetStream context), made on the first delivery.
    slot: Slot<Context>,
}

impl JetStream {
    /// Checks the URL (several may be given, comma-separated); connects to nothing.
    pub fn new(url: &str, subject: &str, timeout: Duration) -> Result<Self, String> {
        let redact = Redact::new(url);
        let servers = url
            .split(',')
            .map(|one| one.trim().parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| redact.text(format!("not a NATS URL: {e}")))?;
        Ok(JetStream {
            servers,
            subject: subject.to_owned(),
            timeout,
            redact,
            slot: Slot::new(),
        })
    }

    /// The shared context, connecting if there is none or its client lost the server.
    async fn context(&self, deadline: Instant) -> Result<(u64, Context), DeliveryError> {
        let connect = || async {
            let options = ConnectOptions::new()
                .name("dinghook")
                .connection_timeout(self.timeout)
                .request_timeout(Some(self.timeout))
                // The client reconnects by itself for a moment; after that it gives up, is
                // dropped here, and the next delivery connects anew. A dropped client that is
                // still reconnecting stops after these few tries too.
                .max_reconnects(3);
            let client = options
                .connect(self.servers.as_slice())
                .await
                .map_err(|e| self.redact.text(format!("could not connect to NATS: {e}")))?;
            let mut context = async_nats::jetstream::new(client);
            context.set_timeout(self.timeout);
            Ok(context)
        };
        let usable = |context: &Context| context.client().connection_state() == State::Connected;
        match timeout_at(deadline, self.slot.get(usable, connect)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(message)) => Err(DeliveryError::retry(message)),
            Err(_) => Err(DeliveryError::retry(format!(
                "could not connect to NATS within {}",
                crate::time::format_duration(self.timeout)
            ))),
        }
    }
}

/// Whether `subject` can be published to: tokens of printable characters, no wildcard.
fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// `value` as a header value (the client panics on a line break in one given as text).
fn header(value: &str) -> Result<HeaderValue, DeliveryError> {
    value.parse().map_err(|_| DeliveryError::Reject {
        message: format!("{value:?} cannot be a NATS header value"),
        status: None,
    })
}

#[async_trait]
impl Destination for JetStream {
    async fn deliver(&self, message: &Message) -> Result<Delivered, DeliveryError> {
        let subject = message.render(&self.subject);
        if !valid_subject(&subject) {
            return Err(DeliveryError::Reject {
                message: format!("{subject:?} is not a NATS subject to publish to"),
                status: None,
            });
        }
        let deadline = Instant::now() + self.timeout;
        let (number, context) = self.context(deadline).await?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, header(&message.id)?);
        headers.insert("Content-Type", header("application/json")?);
        headers.insert("Dinghook-App", header(&message.app)?);
        headers.insert("Dinghook-Type", header(&message.event_type)?);
        let publish = async {
            let ack = context
                .publish_with_headers(subject.clone(), headers, message.body.clone().into())
                .await?;
            ack.await
        };
        let error = match timeout_at(deadline, publish).await {
            Ok(Ok(ack)) => {
                return Ok(Delivered {
                    status: None,
                    receipt: Some(ack.sequence.to_string()),
                })
            }
            Ok(Err(error)) => error,
            Err(_) => {
                self.slot.drop_failed(number);
                return Err(DeliveryError::retry(format!(
                    "no JetStream acknowledgement within {}",
                    crate::time::format_duration(self.timeout)
                )));
            }
        };
        Err(match error.kind() {
            PublishErrorKind::StreamNotFound => DeliveryError::retry(format!(
                "no JetStream stream takes subject {subject:?}: create one whose subjects \
                 include it (dinghook does not create streams)"
            )),
            PublishErrorKind::MaxPayloadExceeded => DeliveryError::Reject {
                message: self.redact.text(error),
                status: None,
            },
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                self.slot.drop_failed(number);
                DeliveryError::retry(self.redact.text(format!("JetStream publish: {error}")))
            }
            // An error the stream answered (full, sealed, …) or a momentary local limit: the
            // connection works.
            _ => DeliveryError::retry(self.redact.text(format!("JetStream publish: {error}"))),
        })
    }

    async fn check(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let (number, context) = self.context(deadline).await.map_err(|e| e.to_string())?;
        // The account's JetStream information, read as plain JSON: the client's own type for
        // it expects fields that older servers (2.9) do not send.
        let client = context.client();
        let info = client.request("$JS.API.INFO", bytes::Bytes::new());
        match timeout_at(deadline, info).await {
            Ok(Ok(answer)) => {
                let answer: serde_json::Value =
                    serde_json::from_slice(&answer.payload).unwrap_or_default();
                match answer.get("error") {
                    None => Ok(()),
                    Some(error) => Err(format!("JetStream is not available: {error}")),
                }
            }
            Ok(Err(e)) => Err(self.redact.text(format!("JetStream is not available: {e}"))),
            Err(_) => {
                self.slot.drop_failed(number);
                Err(format!(
                    "NATS did not answer within {}",
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
    fn subjects_with_wildcards_or_spaces_are_not_published_to() {
        assert!(valid_subject("dinghook.ops.chat_update_title"));
        assert!(!valid_subject("dinghook.ops.*"));
        assert!(!valid_subject("dinghook.>"));
        assert!(!valid_subject("dinghook..x"));
        assert!(!valid_subject("dinghook.a b"));
        assert!(!valid_subject(""));
    }

    #[test]
    fn line_breaks_are_refused_not_sent_as_headers() {
        assert!(header("chat_update_title").is_ok());
        assert!(matches!(
            header("x\r\nNats-Msg-Id: y"),
            Err(DeliveryError::Reject { .. })
        ));
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let error = JetStream::new("nats://u:hunter2@[bad", "s", Duration::from_secs(1))
            .err()
            .unwrap_or_default();
        assert!(error.starts_with("not a NATS URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
