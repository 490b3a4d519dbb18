//! Redis Streams: one `XADD` per message, the envelope in field `envelope` beside `id`, `app`
//! and `type`; the entry id Redis answers with is the confirmation. With `maxlen` the stream
//! is trimmed to about that many entries (`MAXLEN ~`, which Redis does cheaply).

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::{timeout_at, Instant};

use super::broker::{Redact, Slot};
use super::destination::{Delivered, DeliveryError, Destination, Message};

/// A route to a Redis stream.
pub struct RedisStream {
    client: redis::Client,
    /// The key, with `{app}` and `{type}`.
    stream: String,
    maxlen: Option<u64>,
    /// Bounds each delivery and each check, connecting included.
    timeout: Duration,
    redact: Redact,
    /// Made on the first delivery. The manager reconnects by itself after a dropped
    /// connection; after any other failure it is dropped too, and the next delivery makes a
    /// new one.
    slot: Slot<ConnectionManager>,
}

impl RedisStream {
    /// Checks the URL; connects to nothing.
    pub fn new(
        url: &str,
        stream: &str,
        maxlen: Option<u64>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let redact = Redact::new(url);
        let client =
            redis::Client::open(url).map_err(|e| redact.text(format!("not a Redis URL: {e}")))?;
        Ok(RedisStream {
            client,
            stream: stream.to_owned(),
            maxlen,
            timeout,
            redact,
            slot: Slot::new(),
        })
    }

    async fn manager(&self, deadline: Instant) -> Result<(u64, ConnectionManager), DeliveryError> {
        let connect = || async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                // One attempt per delivery: the delivery is retried on the route's schedule.
                .set_number_of_retries(0);
            ConnectionManager::new_with_config(self.client.clone(), config)
                .await
                .map_err(|e| self.redact.text(format!("could not connect to Redis: {e}")))
        };
        match timeout_at(deadline, self.slot.get(|_| true, connect)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(message)) => Err(DeliveryError::retry(message)),
            Err(_) => Err(DeliveryError::retry(format!(
                "could not connect to Redis within {}",
                crate::time::format_duration(self.timeout)
            ))),
        }
    }

    /// Runs `command` on the shared connection within the deadline.
    async fn run<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
        deadline: Instant,
    ) -> Result<T, DeliveryError> {
        let (number, mut manager) = self.manager(deadline).await?;
        match timeout_at(deadline, command.query_async::<T>(&mut manager)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                // An error Redis answered (WRONGTYPE, OOM, …) came over a working connection.
                if !matches!(
                    error.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) {
                    self.slot.drop_failed(number);
                }
                Err(DeliveryError::retry(
                    self.redact.text(format!("Redis: {error}")),
                ))
            }
            Err(_) => {
                self.slot.drop_failed(number);
                Err(DeliveryError::retry(format!(
                    "no answer from Redis within {}",
                    crate::time::format_duration(self.timeout)
                )))
            }
        }
    }
}

#[async_trait]
impl Destination for RedisStream {
    async fn deliver(&self, message: &Message) -> Result<Delivered, DeliveryError> {
        let deadline = Instant::now() + self.timeout;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(message.render(&self.stream));
        if let Some(maxlen) = self.maxlen {
            xadd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        xadd.arg("*")
            .arg("id")
            .arg(&message.id)
            .arg("app")
            .arg(&message.app)
            .arg("type")
            .arg(&message.event_type)
            .arg("envelope")
            .arg(&message.body);
        let entry: String = self.run(&xadd, deadline).await?;
        Ok(Delivered {
            status: None,
            receipt: Some(entry),
        })
    }

    async fn check(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        self.run::<String>(&redis::cmd("PING"), deadline)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let error = RedisStream::new(
            "redis://:hunter2@127.0.0.1:port",
            "s",
            None,
            Duration::from_secs(1),
        )
        .err()
        .unwrap_or_default();
        assert!(error.starts_with("not a Redis URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(
            RedisStream::new("redis://127.0.0.1:6379", "s", None, Duration::from_secs(1)).is_ok()
        );
    }
}
