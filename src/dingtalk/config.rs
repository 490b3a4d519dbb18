//! Client configuration. Plain data: the lead's config layer fills it from the TOML file and
//! `DINGHOOK_*` variables; the client itself never reads the environment.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::duration_str;

/// Old-API base URL (token in the query, `errcode` in the body).
pub const DEFAULT_OAPI_URL: &str = "https://oapi.dingtalk.com";
/// New-API base URL (token in a header, HTTP status + `code` on error).
pub const DEFAULT_API_URL: &str = "https://api.dingtalk.com";

pub use crate::secret::Secret;

/// Everything [`Client`](super::Client) needs. `Default` gives the Standard edition's limits and
/// the real DingTalk base URLs; only the app key, secret and (for work notifications) agent id
/// have to be filled in.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// The app's AppKey (Client ID).
    pub app_key: String,
    /// The app's AppSecret (Client Secret).
    pub app_secret: Secret,
    /// The app's AgentId; needed only by work notifications.
    #[serde(deserialize_with = "crate::setting::optional_number")]
    pub agent_id: Option<i64>,
    /// Old-API base URL, without a trailing slash.
    pub oapi_url: String,
    /// New-API base URL, without a trailing slash.
    pub api_url: String,
    /// Calls per second allowed for this app (Standard edition: 20). Shared by every call this
    /// client makes; several replicas each get the full budget, so divide it between them.
    #[serde(deserialize_with = "crate::setting::number")]
    pub qps: u32,
    /// API calls per month in the organisation's edition (Standard: 5 000 since 2025-11-19).
    #[serde(deserialize_with = "crate::setting::number")]
    pub monthly_quota: u64,
    /// Share of the monthly quota at which a warning is logged (0.8 = 80 %).
    pub quota_warn_ratio: f64,
    /// Time allowed to open a TCP + TLS connection.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Time allowed for one whole request, answer included.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// Retries after a throttled / busy / banned answer (so at most `max_retries + 1` requests).
    pub max_retries: u32,
    /// First back-off delay; doubled on every retry, with jitter. DingTalk advises about 1 s.
    #[serde(with = "duration_str")]
    pub retry_base_delay: Duration,
    /// Ceiling on one back-off delay.
    #[serde(with = "duration_str")]
    pub retry_max_delay: Duration,
    /// Longest per-IP ban (`status: 1111`) a call will sit out before giving up with
    /// [`Error::IpBanned`](super::Error::IpBanned); longer bans are left to the dispatcher.
    #[serde(with = "duration_str")]
    pub max_ban_wait: Duration,
    /// How long before expiry the token is replaced (capped at half its lifetime).
    #[serde(with = "duration_str")]
    pub token_refresh_margin: Duration,
    /// `User-Agent` header sent with every request.
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            app_key: String::new(),
            app_secret: Secret::default(),
            agent_id: None,
            oapi_url: DEFAULT_OAPI_URL.to_owned(),
            api_url: DEFAULT_API_URL.to_owned(),
            qps: 20,
            monthly_quota: 5_000,
            quota_warn_ratio: 0.8,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_retries: 3,
            retry_base_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(10),
            max_ban_wait: Duration::from_secs(30),
            token_refresh_margin: Duration::from_secs(300),
            user_agent: concat!("dinghook/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl ClientConfig {
    /// Checks the values a client cannot work without.
    pub fn validate(&self) -> Result<(), String> {
        if self.app_key.trim().is_empty() {
            return Err("app_key is empty".into());
        }
        if self.app_secret.is_empty() {
            return Err("app_secret is empty".into());
        }
        if self.qps == 0 {
            return Err("qps must be at least 1".into());
        }
        if !(self.quota_warn_ratio > 0.0 && self.quota_warn_ratio <= 1.0) {
            return Err("quota_warn_ratio must be in (0, 1]".into());
        }
        for (name, url) in [("oapi_url", &self.oapi_url), ("api_url", &self.api_url)] {
            let parsed = reqwest::Url::parse(url).map_err(|e| format!("{name} {url:?}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("{name} {url:?}: scheme must be http or https"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug_and_display() {
        let config = ClientConfig {
            app_secret: Secret::new("s3cr3t-value"),
            ..ClientConfig::default()
        };
        let dump = format!("{config:?} {}", config.app_secret);
        assert!(!dump.contains("s3cr3t-value"), "{dump}");
        assert!(dump.contains("[redacted]"));
    }

    #[test]
    fn deserializes_with_defaults_and_humantime() {
        let config: ClientConfig = toml::from_str(
            r#"
            app_key = "dingkey"
            app_secret = "secret"
            agent_id = 123
            qps = 40
            request_timeout = "2s 500ms"
            "#,
        )
        .unwrap();
        assert_eq!(config.qps, 40);
        assert_eq!(config.agent_id, Some(123));
        assert_eq!(config.request_timeout, Duration::from_millis(2500));
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.oapi_url, DEFAULT_OAPI_URL);
        assert_eq!(config.monthly_quota, 5_000);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validate_rejects_missing_credentials_and_bad_urls() {
        assert!(ClientConfig::default().validate().is_err());
        let config = ClientConfig {
            app_key: "k".into(),
            app_secret: "s".into(),
            oapi_url: "not a url".into(),
            ..ClientConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
