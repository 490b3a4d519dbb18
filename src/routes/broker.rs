//! What the three broker destinations ([`super::jetstream`], [`super::amqp`],
//! [`super::redis_stream`]) share: a connection made on the first delivery, never at start-up
//! (a broker that is down then must not stop the server), shared by the route's deliveries and
//! replaced after it fails; and error texts that never show the URL's password.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

/// The connection a route's deliveries share.
pub(crate) struct Slot<C> {
    /// The connection in use and its number, `None` before the first delivery and after a
    /// failure. The number lets a delivery that saw its connection fail drop that one and not a
    /// newer one another delivery has made since. A std mutex: held only to read or replace
    /// the value, never across an await.
    current: Mutex<Option<(u64, C)>>,
    /// Held while connecting, with the count of connections made: deliveries that find no
    /// connection wait for one attempt instead of each opening a connection of its own.
    connecting: tokio::sync::Mutex<u64>,
}

impl<C: Clone> Slot<C> {
    pub(crate) fn new() -> Self {
        Slot {
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
        }
    }

    /// The connection in use if `usable` says it still is, else a new one from `connect`. The
    /// caller bounds the wait.
    pub(crate) async fn get<F, Fut>(
        &self,
        usable: impl Fn(&C) -> bool,
        connect: F,
    ) -> Result<(u64, C), String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, String>>,
    {
        if let Some(found) = self.usable(&usable) {
            return Ok(found);
        }
        let mut made = self.connecting.lock().await;
        // Another delivery may have connected while this one waited.
        if let Some(found) = self.usable(&usable) {
            return Ok(found);
        }
        let connection = connect().await?;
        *made += 1;
        *self.lock() = Some((*made, connection.clone()));
        Ok((*made, connection))
    }

    /// Drops connection `number` (a delivery saw it fail or time out), so that the next
    /// delivery connects again. Deliveries still using it keep their clone until they finish.
    pub(crate) fn drop_failed(&self, number: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|(n, _)| *n == number) {
            *current = None;
        }
    }

    fn usable(&self, usable: &impl Fn(&C) -> bool) -> Option<(u64, C)> {
        let mut current = self.lock();
        match current.as_ref() {
            Some((number, connection)) if usable(connection) => Some((*number, connection.clone())),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, C)>> {
        // Nothing panics while holding it; a poisoned value is still a whole value.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hides a URL's secrets in the text of a client library's error, which may quote the URL or
/// its parts (lapin's "Invalid URL" does). The secret is the password, or for a URL with a
/// user part only (a NATS token) that part.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redact {
    secrets: Vec<String>,
}

impl Redact {
    /// The secrets of `url`, or of each URL of a comma-separated list.
    pub(crate) fn new(url: &str) -> Self {
        let mut secrets = Vec::new();
        for one in url.split(',') {
            let Some((_, rest)) = one.split_once("://") else {
                continue;
            };
            let Some(at) = rest.rfind('@') else {
                continue;
            };
            let userinfo = &rest[..at];
            let secret = userinfo
                .split_once(':')
                .map_or(userinfo, |(_, password)| password);
            if secret.is_empty() {
                continue;
            }
            let decoded = percent_decode(secret);
            if decoded != secret && !decoded.is_empty() {
                secrets.push(decoded);
            }
            secrets.push(secret.to_owned());
        }
        // Longest first, so that a secret holding another is hidden whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redact { secrets }
    }

    /// `text` with every secret replaced by `***`.
    pub(crate) fn text(&self, text: impl std::fmt::Display) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }
}

/// `%XX` escapes decoded (invalid escapes and non-UTF-8 results left as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_hidden_as_written_and_decoded() {
        let r = Redact::new("amqp://guest:p%40ss@127.0.0.1:5672/%2f");
        assert_eq!(
            r.text("Invalid URL: 'amqp://guest:p%40ss@127.0.0.1:5672/%2f' (p@ss)"),
            "Invalid URL: 'amqp://guest:***@127.0.0.1:5672/%2f' (***)"
        );
        let r = Redact::new("nats://s3cr3t-token@a:4222,nats://u:pw@b:4222");
        assert_eq!(r.text("s3cr3t-token pw"), "*** ***");
        let r = Redact::new("redis://:hunter2@127.0.0.1:6379");
        assert_eq!(r.text("auth hunter2 failed"), "auth *** failed");
        let r = Redact::new("redis://127.0.0.1:6379");
        assert_eq!(r.text("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn percent_escapes_decode_and_bad_ones_stay() {
        assert_eq!(percent_decode("a%20b%2F"), "a b/");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[tokio::test]
    async fn one_connection_is_shared_and_a_failed_one_replaced() {
        let slot: Slot<&'static str> = Slot::new();
        let (first, c) = slot.get(|_| true, || async { Ok("a") }).await.unwrap();
        assert_eq!(c, "a");
        let (again, c) = slot.get(|_| true, || async { Ok("b") }).await.unwrap();
        assert_eq!((again, c), (first, "a"));
        slot.drop_failed(first);
        let (second, c) = slot.get(|_| true, || async { Ok("b") }).await.unwrap();
        assert_eq!(c, "b");
        // A late report about the first connection does not drop the second.
        slot.drop_failed(first);
        let (still, _) = slot.get(|_| true, || async { Ok("c") }).await.unwrap();
        assert_eq!(still, second);
        // An unusable connection is replaced; a failed connect leaves none.
        let err = slot
            .get(|_| false, || async { Err("refused".to_owned()) })
            .await
            .unwrap_err();
        assert_eq!(err, "refused");
        let (_, c) = slot.get(|_| true, || async { Ok("d") }).await.unwrap();
        assert_eq!(c, "d");
    }
}
