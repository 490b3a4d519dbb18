//! Signed HTTP: a POST of the envelope with Standard Webhooks headers.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};

use super::destination::{excerpt, Delivered, DeliveryError, Destination, Message};
use super::signing::{signature_header, SigningKey};

/// A route to an HTTP endpoint.
pub struct Webhook {
    client: reqwest::Client,
    url: String,
    /// One signature per key (several during a rotation).
    keys: Vec<SigningKey>,
    /// The route's own headers, sent with every request.
    headers: HeaderMap,
}

/// Why a webhook destination cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("header {0:?}: not a valid HTTP header name or value")]
    Header(String),
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Webhook {
    pub fn new(
        url: &str,
        keys: Vec<SigningKey>,
        headers: &std::collections::BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, WebhookError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let bad = || WebhookError::Header(name.clone());
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?,
                HeaderValue::from_str(value).map_err(|_| bad())?,
            );
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // A redirected POST may become a GET elsewhere: a redirect is an answer to fix.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dinghook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Webhook {
            client,
            url: url.to_owned(),
            keys,
            headers: map,
        })
    }
}

#[async_trait]
impl Destination for Webhook {
    async fn deliver(&self, message: &Message) -> Result<Delivered, DeliveryError> {
        let timestamp = crate::time::now_millis() / 1000;
        let signature = signature_header(&self.keys, &message.id, timestamp, &message.body);
        let response = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &message.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(message.body.clone())
            .send()
            .await
            .map_err(|e| DeliveryError::retry(describe(e)))?;
        let status = response.status();
        let code = status.as_u16();
        if status.is_success() {
            return Ok(Delivered {
                status: Some(code),
                receipt: None,
            });
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // The body says why; bounded, so a huge error page costs nothing.
        let body = read_excerpt(response).await;
        let message = if body.is_empty() {
            format!("HTTP {code}")
        } else {
            format!("HTTP {code}: {body}")
        };
        Err(match code {
            408 | 429 | 500..=599 => DeliveryError::Retry {
                message,
                status: Some(code),
                retry_after,
            },
            410 => DeliveryError::Gone {
                message,
                status: Some(code),
            },
            _ => DeliveryError::Reject {
                message,
                status: Some(code),
            },
        })
    }
}

/// The first bytes of the answer's body (at most a few KiB are read).
async fn read_excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < 4096 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt(&body)
}

/// A transport error in a few words, without the URL's query (reqwest's text names the URL).
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        format!("request failed: {}", e.without_url())
    }
}

/// `Retry-After`: seconds, or an HTTP date (RFC 9110), as a wait from now; capped at a day.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
        let now = jiff::Timestamp::now();
        Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(90);
        let text = jiff::fmt::rfc2822::to_string(&later.to_zoned(jiff::tz::TimeZone::UTC)).unwrap();
        let wait = parse_retry_after(&text).unwrap();
        assert!((85..=90).contains(&wait.as_secs()), "{text}: {wait:?}");
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("999999999"),
            Some(Duration::from_secs(86_400))
        );
    }
}
