//! The whole configuration: compiled-in defaults, then a TOML file, then `DINGHOOK_*`
//! environment variables, validated once at start-up. Every key is documented in
//! `config/dinghook.toml`.
//!
//! Each section belongs to the module it configures (`[callback]` to
//! [`sources::push`](crate::sources::push), `[store]` to [`store`](crate::store), and so on);
//! this module only composes them, layers the sources (figment) and checks what spans
//! sections. Nothing below the application imports it.

pub mod apps;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::builtin::HandlersConfig;
use crate::dingtalk::ClientConfig;
use crate::dispatch::DispatchConfig;
use crate::forwarded::TrustedProxies;
use crate::ops::OpsConfig;
use crate::server::ServerConfig;
use crate::sources::push::CallbackConfig;
use crate::sources::recovery::RecoveryConfig;
use crate::sources::stream::StreamConfig;
use crate::store::{redact_url, StoreConfig, StoreLocation};
use crate::telemetry::LogFormat;

pub use apps::{AppSpec, DEFAULT_APP};

/// A configuration problem, naming the key (and its environment variable) and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} ({env}): {message}")]
    Invalid {
        key: String,
        env: String,
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        env: env_name(key).to_owned(),
        message: message.into(),
    }
}

/// The environment variable for each config key. One table, so the README, the validation
/// messages and the loader cannot drift apart.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("listen", "DINGHOOK_LISTEN"),
    ("log_format", "DINGHOOK_LOG_FORMAT"),
    ("log_level", "DINGHOOK_LOG"),
    ("shutdown_timeout", "DINGHOOK_SHUTDOWN_TIMEOUT"),
    ("request_timeout", "DINGHOOK_REQUEST_TIMEOUT"),
    ("server.header_timeout", "DINGHOOK_HEADER_TIMEOUT"),
    ("server.max_connections", "DINGHOOK_MAX_CONNECTIONS"),
    (
        "server.max_connections_per_client",
        "DINGHOOK_MAX_CONNECTIONS_PER_CLIENT",
    ),
    ("ops.listen", "DINGHOOK_OPS_LISTEN"),
    ("api.listen", "DINGHOOK_API_LISTEN"),
    ("api.token", "DINGHOOK_API_TOKEN"),
    ("api.public_url", "DINGHOOK_PUBLIC_URL"),
    ("callback.path", "DINGHOOK_CALLBACK_PATH"),
    ("callback.token", "DINGHOOK_TOKEN"),
    ("callback.aes_key", "DINGHOOK_AES_KEY"),
    ("callback.previous_aes_keys", "DINGHOOK_PREVIOUS_AES_KEYS"),
    ("callback.owner_key", "DINGHOOK_OWNER_KEY"),
    ("callback.body_limit", "DINGHOOK_BODY_LIMIT"),
    ("callback.body_budget", "DINGHOOK_BODY_BUDGET"),
    ("callback.replay_window", "DINGHOOK_REPLAY_WINDOW"),
    ("callback.trusted_proxies", "DINGHOOK_TRUSTED_PROXIES"),
    ("store.url", "DINGHOOK_STORE_URL"),
    ("store.max_batch", "DINGHOOK_STORE_MAX_BATCH"),
    ("dingtalk.app_key", "DINGHOOK_APP_KEY"),
    ("dingtalk.app_secret", "DINGHOOK_APP_SECRET"),
    ("dingtalk.agent_id", "DINGHOOK_AGENT_ID"),
    ("dingtalk.oapi_url", "DINGHOOK_DINGTALK_OAPI_URL"),
    ("dingtalk.api_url", "DINGHOOK_DINGTALK_API_URL"),
    ("dingtalk.qps", "DINGHOOK_DINGTALK_QPS"),
    ("dingtalk.monthly_quota", "DINGHOOK_DINGTALK_MONTHLY_QUOTA"),
    ("dispatch.enabled", "DINGHOOK_DISPATCH"),
    ("dispatch.workers", "DINGHOOK_WORKERS"),
    ("dispatch.batch_size", "DINGHOOK_BATCH_SIZE"),
    ("dispatch.lease", "DINGHOOK_LEASE"),
    ("dispatch.poll_interval", "DINGHOOK_POLL_INTERVAL"),
    ("dispatch.handler_timeout", "DINGHOOK_HANDLER_TIMEOUT"),
    ("dispatch.retry_schedule", "DINGHOOK_RETRY_SCHEDULE"),
    ("dispatch.retry_jitter", "DINGHOOK_RETRY_JITTER"),
    ("recovery.enabled", "DINGHOOK_RECOVERY"),
    ("recovery.interval", "DINGHOOK_RECOVERY_INTERVAL"),
    ("stream.enabled", "DINGHOOK_STREAM"),
    ("stream.robot", "DINGHOOK_STREAM_ROBOT"),
    ("stream.concurrency", "DINGHOOK_STREAM_CONCURRENCY"),
    ("stream.backoff_base", "DINGHOOK_STREAM_BACKOFF_BASE"),
    ("stream.backoff_max", "DINGHOOK_STREAM_BACKOFF_MAX"),
    ("stream.backoff_jitter", "DINGHOOK_STREAM_BACKOFF_JITTER"),
    ("stream.watchdog", "DINGHOOK_STREAM_WATCHDOG"),
    ("stream.ping_interval", "DINGHOOK_STREAM_PING_INTERVAL"),
    ("stream.store_timeout", "DINGHOOK_STREAM_STORE_TIMEOUT"),
    ("stream.open_timeout", "DINGHOOK_STREAM_OPEN_TIMEOUT"),
    ("stream.max_frame", "DINGHOOK_STREAM_MAX_FRAME"),
    ("retention.done", "DINGHOOK_RETENTION_DONE"),
    ("retention.dead", "DINGHOOK_RETENTION_DEAD"),
    ("retention.audit", "DINGHOOK_RETENTION_AUDIT"),
    ("retention.interval", "DINGHOOK_RETENTION_INTERVAL"),
    ("retention.batch", "DINGHOOK_RETENTION_BATCH"),
];

fn env_name(key: &str) -> &'static str {
    ENV_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, e)| *e)
        .unwrap_or("no environment variable")
}

/// The whole configuration, as loaded (strings not yet parsed into keys and addresses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds, e.g. `127.0.0.1:8080` or `0.0.0.0:8080`.
    pub listen: String,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `dinghook=debug,tower_http=info`.
    pub log_level: String,
    /// How long a graceful shutdown may take before in-flight work is abandoned.
    #[serde(with = "crate::time::duration_str")]
    pub shutdown_timeout: Duration,
    /// Upper bound for one callback request, body read and durable write included. Also how
    /// long a shutdown waits for requests in flight.
    #[serde(with = "crate::time::duration_str")]
    pub request_timeout: Duration,
    /// How the listeners treat connections: timeouts and caps.
    pub server: ServerConfig,
    /// The operator listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops: OpsConfig,
    /// The HTTP API for the user's systems (off unless `api.listen` is set).
    pub api: crate::api::ApiConfig,
    pub callback: CallbackConfig,
    pub store: StoreConfig,
    pub dispatch: DispatchConfig,
    /// The DingTalk API client the handlers use.
    pub dingtalk: ClientConfig,
    /// The built-in handlers.
    pub handlers: HandlersConfig,
    /// Reading DingTalk's failed-push list (needs the DingTalk client).
    pub recovery: RecoveryConfig,
    /// Stream mode: `enabled` for the top-level app, the knobs for every app.
    pub stream: StreamConfig,
    /// How long ended events and records are kept (`done` and `dead` also per app).
    pub retention: crate::retention::RetentionConfig,
    /// `[apps.NAME]` tables as written; [`Config::apps`] resolves them (see [`apps`]).
    #[serde(skip_serializing)]
    pub apps: BTreeMap<String, Value>,
    /// `[[routes]]`: where events go on to ([`crate::routes`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::routes::config::RouteConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            shutdown_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            server: ServerConfig::default(),
            ops: OpsConfig::default(),
            api: crate::api::ApiConfig::default(),
            callback: CallbackConfig::default(),
            store: StoreConfig::default(),
            dispatch: DispatchConfig::default(),
            dingtalk: ClientConfig::default(),
            handlers: HandlersConfig::default(),
            recovery: RecoveryConfig::default(),
            stream: StreamConfig::default(),
            retention: crate::retention::RetentionConfig::default(),
            apps: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, &process_env())
    }

    /// Like [`Config::load`] with an explicit environment (name, value), for tests.
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(file, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads the store settings only, for commands that need no callback keys
    /// (`dinghook events …`).
    pub fn load_for_store(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(file, &process_env())?;
        config.store_location()?;
        Ok(config)
    }

    /// Loads enough to find the operator listener (`dinghook reload`): a configuration the
    /// server would refuse still names where to send the reload, which then says why.
    pub fn load_for_ops(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(file, &process_env())?;
        config.ops_addr()?;
        Ok(config)
    }

    fn load_unvalidated(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        // Missing keys take the serde defaults of each section, so no defaults provider.
        let mut figment = Figment::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::string(&text));
        }
        let file_apps: Vec<String> = figment
            .find_value("apps")
            .ok()
            .and_then(|v| v.into_dict())
            .map(|apps| apps.into_keys().collect())
            .unwrap_or_default();
        let environment = Environment::read(env, &file_apps);
        let from_env = !environment.values.is_empty();
        figment = figment.merge(environment);
        figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let in_env = from_env && e.metadata.as_ref().is_some_and(|m| m.name == ENV_SOURCE);
            match file {
                Some(path) if !in_env => ConfigError::Parse {
                    path: path.to_owned(),
                    message: if key.is_empty() {
                        describe(&e)
                    } else {
                        format!("{key}: {}", describe(&e))
                    },
                },
                _ if key.starts_with("apps.") => {
                    let mut parts = key.splitn(3, '.').skip(1);
                    let (app, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    apps::app_invalid(app, rest, describe(&e))
                }
                _ => invalid(&key, describe(&e)),
            }
        })
    }

    /// Checks everything that can be checked without I/O (but reading secret files). Messages
    /// never contain secrets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validated_apps().map(|_| ())
    }

    /// [`Config::validate`], returning the apps it resolved (so a caller that needs them does
    /// not resolve them twice: with a thousand apps that is most of the start-up).
    pub fn validated_apps(&self) -> Result<Vec<AppSpec>, ConfigError> {
        self.listen_addr()?;
        self.ops_addr()?;
        self.api_addr()?;
        self.public_url()?;
        self.check_ranges()?;
        self.trusted_proxies()?;
        StoreLocation::parse(&self.store.url).map_err(|m| invalid("store.url", m))?;
        let d = &self.dispatch;
        if d.handler_timeout >= d.lease {
            return Err(invalid(
                "dispatch.handler_timeout",
                "must be shorter than dispatch.lease, or a slow handler's event would run twice",
            ));
        }
        if !(0.0..1.0).contains(&d.retry_jitter) {
            return Err(invalid("dispatch.retry_jitter", "must be in 0.0..1.0"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", e.to_string()))?;
        // Each app's keys, client, handler options and recovery; paths distinct.
        let apps = self.apps()?;
        self.routes_for(&apps)?;
        self.api_tokens(&apps)?;
        Ok(apps)
    }

    /// The API listener's address, unless `api.listen` is empty (the API is off).
    pub fn api_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.api.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            invalid(
                "api.listen",
                format!("{listen:?} is not an address like 127.0.0.1:8081 (empty: off)"),
            )
        })
    }

    /// `api.public_url`: the address DingTalk reaches dinghook's public listener by
    /// (`https://hooks.example.com`, or with a path prefix a proxy strips), without a trailing
    /// `/`; `None` when it is not set. An http(s) URL without query or fragment.
    pub fn public_url(&self) -> Result<Option<String>, ConfigError> {
        let text = self.api.public_url.trim().trim_end_matches('/');
        if text.is_empty() {
            return Ok(None);
        }
        let wrong = || {
            invalid(
                "api.public_url",
                format!(
                    "{text:?} is not an http(s) URL like https://hooks.example.com (no query or fragment)"
                ),
            )
        };
        let url = reqwest::Url::parse(text).map_err(|_| wrong())?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none_or(str::is_empty)
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(wrong());
        }
        Ok(Some(text.to_owned()))
    }

    /// The API's tokens (`api.token` and `[[api.tokens]]`, token files read), checked against
    /// the configured `apps`. With the API on, at least one is needed.
    pub fn api_tokens(&self, apps: &[AppSpec]) -> Result<crate::api::Tokens, ConfigError> {
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        let tokens = crate::api::Tokens::resolve(&self.api.token, &self.api.tokens, &names)
            .map_err(|e| ConfigError::Invalid {
                env: env_name(&e.key).to_owned(),
                key: e.key,
                message: e.message,
            })?;
        if tokens.is_empty() && !self.api.listen.trim().is_empty() {
            return Err(invalid(
                "api.token",
                "the API is on (api.listen) but has no token: set DINGHOOK_API_TOKEN or [[api.tokens]]",
            ));
        }
        Ok(tokens)
    }

    /// The `[[routes]]`, validated against the configured `apps`.
    pub fn routes_for(
        &self,
        apps: &[AppSpec],
    ) -> Result<crate::routes::config::Routes, ConfigError> {
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        crate::routes::config::resolve(&self.routes, &names).map_err(|e| ConfigError::Invalid {
            key: e.key,
            env: "set in the configuration file".into(),
            message: e.message,
        })
    }

    /// Every number and duration within a range that works: outside it a value crashes the
    /// process (a batch size that allocates terabytes), refuses every request (a zero request
    /// time-out) or spends the month's DingTalk quota in minutes (a millisecond recovery
    /// interval). The message names the key and the range.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        let (c, d) = (&self.callback, &self.dispatch);
        let numbers: [(&str, u64, u64, u64); 7] = [
            ("callback.body_limit", c.body_limit as u64, 64, 64 << 20),
            (
                "callback.body_budget",
                c.body_budget as u64,
                c.body_limit as u64,
                16 << 30,
            ),
            (
                "server.max_connections",
                self.server.max_connections.unwrap_or(1).max(0) as u64,
                1,
                1_000_000,
            ),
            (
                "server.max_connections_per_client",
                self.server.max_connections_per_client as u64,
                1,
                1_000_000,
            ),
            ("store.max_batch", self.store.max_batch as u64, 1, 10_000),
            ("dispatch.workers", d.workers as u64, 1, 1_024),
            ("dispatch.batch_size", u64::from(d.batch_size), 1, 10_000),
        ];
        for (key, value, min, max) in numbers {
            if !(min..=max).contains(&value) {
                return Err(invalid(key, format!("{value} is outside {min}..={max}")));
            }
        }
        let mut durations: Vec<(&str, Duration, Duration, Duration)> = vec![
            (
                "shutdown_timeout",
                self.shutdown_timeout,
                Duration::ZERO,
                HOUR,
            ),
            ("request_timeout", self.request_timeout, 100 * MS, 5 * MIN),
            (
                "server.header_timeout",
                self.server.header_timeout,
                100 * MS,
                HOUR,
            ),
            (
                "callback.replay_window",
                c.replay_window,
                Duration::ZERO,
                30 * DAY,
            ),
            ("dispatch.lease", d.lease, SEC, DAY),
            ("dispatch.poll_interval", d.poll_interval, MS, HOUR),
            ("dispatch.handler_timeout", d.handler_timeout, MS, DAY),
        ];
        if d.retry_schedule.len() > 100 {
            return Err(invalid(
                "dispatch.retry_schedule",
                "has more than 100 delays",
            ));
        }
        for delay in &d.retry_schedule {
            durations.push(("dispatch.retry_schedule", *delay, Duration::ZERO, 30 * DAY));
        }
        if let Err((key, message)) = self.retention.check() {
            return Err(invalid(&format!("retention.{key}"), message));
        }
        check_durations(&durations, invalid)
    }

    /// True when an app key is configured, so handlers get a DingTalk client.
    pub fn dingtalk_enabled(&self) -> bool {
        !self.dingtalk.app_key.trim().is_empty()
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:8080", self.listen),
            )
        })
    }

    /// Every app, resolved and checked (see [`apps`]): `default` from the top-level keys, then
    /// each `[apps.NAME]`. Reads secret files.
    pub fn apps(&self) -> Result<Vec<AppSpec>, ConfigError> {
        apps::resolve(self)
    }

    /// The operator listener's address; `None` when `ops.listen` is empty (off).
    pub fn ops_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.ops.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            invalid(
                "ops.listen",
                format!("{listen:?} is not an address like 127.0.0.1:9464 (empty: off)"),
            )
        })
    }

    /// The parsed `callback.trusted_proxies`.
    pub fn trusted_proxies(&self) -> Result<TrustedProxies, ConfigError> {
        TrustedProxies::parse(&self.callback.trusted_proxies)
            .map_err(|e| invalid("callback.trusted_proxies", e.to_string()))
    }

    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        StoreLocation::parse(&self.store.url).map_err(|m| invalid("store.url", m))
    }

    /// The effective configuration as TOML, secrets replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store.url = redact_url(&shown.store.url);
        for route in &mut shown.routes {
            route.url = redact_url(&route.url);
        }
        let mut text =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        // The apps' own tables, resolved (inherited keys filled in), secrets redacted.
        #[derive(Serialize)]
        struct Apps {
            apps: BTreeMap<String, AppSpec>,
        }
        let apps: BTreeMap<String, AppSpec> = self
            .apps()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| self.apps.contains_key(&a.name))
            .map(|a| (a.name.clone(), a))
            .collect();
        if !apps.is_empty() {
            text.push('\n');
            text.push_str(
                &toml::to_string_pretty(&Apps { apps })
                    .unwrap_or_else(|e| format!("# cannot render apps: {e}\n")),
            );
        }
        text
    }
}

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn check_durations(
    durations: &[(&str, Duration, Duration, Duration)],
    invalid: impl Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for &(key, value, min, max) in durations {
        if value < min || value > max {
            let show = crate::time::format_duration;
            return Err(invalid(
                key,
                format!("{} is outside {}..={}", show(value), show(min), show(max)),
            ));
        }
    }
    Ok(())
}

/// The ranges of an app's DingTalk client and recovery (see `check_ranges`).
fn check_client_ranges(app: &AppSpec) -> Result<(), ConfigError> {
    let t = &app.dingtalk;
    let numbers: [(&str, u64, u64, u64); 3] = [
        ("qps", u64::from(t.qps), 1, 100_000),
        ("monthly_quota", t.monthly_quota, 1, 1 << 40),
        ("max_retries", u64::from(t.max_retries), 0, 100),
    ];
    for (key, value, min, max) in numbers {
        if !(min..=max).contains(&value) {
            return Err(app.invalid(key, format!("{value} is outside {min}..={max}")));
        }
    }
    let mut durations = vec![
        ("connect_timeout", t.connect_timeout, MS, 5 * MIN),
        ("request_timeout", t.request_timeout, MS, 5 * MIN),
        ("retry_base_delay", t.retry_base_delay, Duration::ZERO, HOUR),
        ("retry_max_delay", t.retry_max_delay, Duration::ZERO, DAY),
        ("max_ban_wait", t.max_ban_wait, Duration::ZERO, DAY),
        (
            "token_refresh_margin",
            t.token_refresh_margin,
            Duration::ZERO,
            HOUR,
        ),
    ];
    if app.recovery.enabled {
        // Each read of the failed-push list is a metered call.
        durations.push(("recovery.interval", app.recovery.interval, SEC, 30 * DAY));
    }
    check_durations(&durations, |key, message| app.invalid(key, message))?;
    check_stream_ranges(app)
}

/// The ranges of an app's `[stream]` knobs (see `check_ranges`).
fn check_stream_ranges(app: &AppSpec) -> Result<(), ConfigError> {
    let s = &app.stream;
    let numbers: [(&str, u64, u64, u64); 2] = [
        ("stream.concurrency", s.concurrency as u64, 1, 10_000),
        ("stream.max_frame", s.max_frame as u64, 1024, 64 << 20),
    ];
    for (key, value, min, max) in numbers {
        if !(min..=max).contains(&value) {
            return Err(app.invalid(key, format!("{value} is outside {min}..={max}")));
        }
    }
    if !(0.0..1.0).contains(&s.backoff_jitter) {
        return Err(app.invalid("stream.backoff_jitter", "must be in 0.0..1.0"));
    }
    let durations = [
        ("stream.backoff_base", s.backoff_base, MS, HOUR),
        ("stream.backoff_max", s.backoff_max, s.backoff_base, DAY),
        ("stream.watchdog", s.watchdog, 100 * MS, HOUR),
        ("stream.ping_interval", s.ping_interval, 10 * MS, HOUR),
        ("stream.store_timeout", s.store_timeout, 10 * MS, 5 * MIN),
        ("stream.open_timeout", s.open_timeout, 10 * MS, 5 * MIN),
    ];
    check_durations(&durations, |key, message| app.invalid(key, message))?;
    if s.ping_interval >= s.watchdog {
        return Err(app.invalid(
            "stream.ping_interval",
            "must be shorter than stream.watchdog, or a quiet but healthy connection is ended",
        ));
    }
    Ok(())
}

/// A path the router takes literally: `/`, then letters, digits and `-._~/` only. The router
/// reads `{name}` and `{*rest}` as captures and refuses `*`/`:` segments at start-up (a panic),
/// so those characters never reach it.
fn check_literal_path(key: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(key, "must start with '/'"));
    }
    if let Some(bad) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~/".contains(*c)))
    {
        return Err(invalid(
            key,
            format!("{bad:?} is not allowed: use letters, digits and - . _ ~ /"),
        ));
    }
    if path.contains("//") {
        return Err(invalid(key, "must not contain an empty segment (//)"));
    }
    Ok(())
}

/// The name figment gives the environment in its errors.
const ENV_SOURCE: &str = "DINGHOOK_* environment variables";

/// The `DINGHOOK_*` variables of [`ENV_KEYS`] as a figment provider. Every value stays a
/// string (figment's own `Env` would turn a numeric secret into a number); the sections'
/// deserializers read numbers, switches and lists from text.
struct Environment {
    values: Vec<(String, String)>,
}

impl Environment {
    /// The variables of [`ENV_KEYS`] and the `DINGHOOK_APPS__…` ones (`file_apps`: the app
    /// names the file uses, so `OPS_EU` finds `ops-eu`).
    fn read(env: &[(String, String)], file_apps: &[String]) -> Self {
        let lookup = |var: &str| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone());
        let mut values: Vec<(String, String)> = ENV_KEYS
            .iter()
            .filter_map(|(key, var)| lookup(var).map(|value| ((*key).to_owned(), value)))
            .collect();
        values.extend(apps::from_environment(env, file_apps));
        Environment { values }
    }
}

/// This process's environment, for [`Config::load`].
fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, value) in &self.values {
            let mut path: Vec<&str> = key.split('.').collect();
            let Some(leaf) = path.pop() else { continue };
            let mut table = &mut root;
            for part in path {
                let entry = table
                    .entry(part.to_owned())
                    .or_insert_with(|| Value::from(Dict::new()));
                table = match entry {
                    Value::Dict(_, inner) => inner,
                    _ => return Err(figment::Error::from(format!("{key}: not a section"))),
                };
            }
            table.insert(leaf.to_owned(), Value::from(value.clone()));
        }
        Ok(Profile::Default.collect(root))
    }
}

/// A figment error's reason without its location (the key and variable are named apart) and
/// without the offending value when it could be a secret.
fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    match &e.kind {
        // "found string \"…\"" would repeat the value, which may be a secret.
        Kind::InvalidType(_, expected) => format!("has the wrong type: expected {expected}"),
        Kind::InvalidValue(_, expected) => format!("is not valid: expected {expected}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "1234567890123456789012345678901234567890123";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn minimal() -> Vec<(&'static str, &'static str)> {
        vec![
            ("DINGHOOK_TOKEN", "tok"),
            ("DINGHOOK_AES_KEY", KEY),
            ("DINGHOOK_OWNER_KEY", "dingapp"),
        ]
    }

    #[test]
    fn environment_alone_is_enough() {
        let mut vars = minimal();
        vars.push(("DINGHOOK_LISTEN", "0.0.0.0:9999"));
        vars.push(("DINGHOOK_STORE_URL", "sqlite:///data/x.db"));
        vars.push(("DINGHOOK_CALLBACK_PATH", "/hook"));
        vars.push(("DINGHOOK_REPLAY_WINDOW", "0"));
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9999");
        assert_eq!(c.callback.path, "/hook");
        assert_eq!(c.callback.replay_window, Duration::ZERO);
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Sqlite(PathBuf::from("/data/x.db"))
        );
    }

    #[test]
    fn the_public_url_is_an_http_url() {
        let mut vars = minimal();
        vars.push(("DINGHOOK_PUBLIC_URL", "https://hooks.example.com/"));
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        assert_eq!(
            c.public_url().unwrap().as_deref(),
            Some("https://hooks.example.com")
        );
        let mut c = Config::load_with_env(None, &env(&minimal())).unwrap();
        assert_eq!(c.public_url().unwrap(), None);
        for bad in [
            "hooks.example.com",
            "ftp://hooks.example.com",
            "https://hooks.example.com/?a=1",
            "https://user:pw@hooks.example.com",
            "https://",
        ] {
            c.api.public_url = bad.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("api.public_url") && e.contains("DINGHOOK_PUBLIC_URL"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn dispatch_settings_from_the_environment() {
        let mut vars = minimal();
        vars.push(("DINGHOOK_RETRY_SCHEDULE", "1s, 2s,3m"));
        vars.push(("DINGHOOK_WORKERS", "2"));
        vars.push(("DINGHOOK_DISPATCH", "off"));
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        assert_eq!(
            c.dispatch.retry_schedule,
            [1, 2, 180].map(Duration::from_secs).to_vec()
        );
        assert_eq!(c.dispatch.workers, 2);
        assert!(!c.dispatch.enabled);
        let mut vars = minimal();
        vars.push(("DINGHOOK_HANDLER_TIMEOUT", "10m"));
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dispatch.handler_timeout"), "{err}");
    }

    #[test]
    fn dingtalk_client_settings_from_the_environment() {
        let mut vars = minimal();
        vars.extend([
            ("DINGHOOK_APP_KEY", "dingappkey"),
            ("DINGHOOK_APP_SECRET", "app-secret-value"),
            ("DINGHOOK_AGENT_ID", "123"),
            ("DINGHOOK_DINGTALK_OAPI_URL", "http://127.0.0.1:9000"),
            ("DINGHOOK_DINGTALK_API_URL", "http://127.0.0.1:9000"),
            ("DINGHOOK_DINGTALK_QPS", "40"),
            ("DINGHOOK_DINGTALK_MONTHLY_QUOTA", "200000"),
        ]);
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        assert!(c.dingtalk_enabled());
        assert_eq!(c.dingtalk.agent_id, Some(123));
        assert_eq!(c.dingtalk.qps, 40);
        assert_eq!(c.dingtalk.monthly_quota, 200_000);
        assert_eq!(c.dingtalk.oapi_url, "http://127.0.0.1:9000");
        assert!(!c.to_redacted_toml().contains("app-secret-value"));

        let mut vars = minimal();
        vars.push(("DINGHOOK_APP_SECRET", "x"));
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DINGHOOK_APP_KEY"), "{err}");
        let mut vars = minimal();
        vars.extend([
            ("DINGHOOK_APP_KEY", "k"),
            ("DINGHOOK_APP_SECRET", "s"),
            ("DINGHOOK_DINGTALK_QPS", "0"),
        ]);
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("qps"), "{err}");
    }

    #[test]
    fn trusted_proxies_from_the_environment_and_the_file() {
        let c = Config::load_with_env(None, &env(&minimal())).unwrap();
        assert!(c.trusted_proxies().unwrap().is_empty(), "none by default");

        let mut vars = minimal();
        vars.push((
            "DINGHOOK_TRUSTED_PROXIES",
            "127.0.0.1/32, 10.0.0.0/8,,fd00::/8",
        ));
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        assert_eq!(
            c.callback.trusted_proxies,
            ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
        );
        let t = c.trusted_proxies().unwrap();
        assert!(t.contains("10.2.3.4".parse().unwrap()));
        assert!(!t.contains("192.168.0.1".parse().unwrap()));

        let mut vars = minimal();
        vars.push(("DINGHOOK_TRUSTED_PROXIES", "10.0.0.0/8,10.0.0.0/40"));
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("callback.trusted_proxies"), "{err}");
        assert!(err.contains("DINGHOOK_TRUSTED_PROXIES"), "{err}");
        assert!(err.contains("10.0.0.0/40"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[callback]\ntrusted_proxies = [\"::1\", \"172.16.0.0/12\"]\n",
        )
        .unwrap();
        let c = Config::load_with_env(Some(&path), &env(&minimal())).unwrap();
        assert!(c
            .trusted_proxies()
            .unwrap()
            .contains("172.20.0.1".parse().unwrap()));
        std::fs::write(&path, "[callback]\ntrusted_proxies = [\"proxy.local\"]\n").unwrap();
        let err = Config::load_with_env(Some(&path), &env(&minimal()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("callback.trusted_proxies") && err.contains("proxy.local"),
            "{err}"
        );
    }

    #[test]
    fn relative_and_absolute_sqlite_urls() {
        assert_eq!(
            StoreLocation::parse("sqlite://data/x.db").unwrap(),
            StoreLocation::Sqlite(PathBuf::from("data/x.db"))
        );
        assert!(StoreLocation::parse("mysql://x").is_err());
        assert!(StoreLocation::parse("sqlite://").is_err());
    }

    #[test]
    fn a_bad_value_names_the_key_and_variable_but_not_the_secret() {
        let mut vars = minimal();
        vars[1] = ("DINGHOOK_AES_KEY", "short-secret-value");
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("callback.aes_key"), "{err}");
        assert!(err.contains("DINGHOOK_AES_KEY"), "{err}");
        assert!(!err.contains("short-secret-value"), "{err}");

        let mut vars = minimal();
        vars.push(("DINGHOOK_REPLAY_WINDOW", "soon"));
        let err = Config::load_with_env(None, &env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DINGHOOK_REPLAY_WINDOW"), "{err}");
    }

    #[test]
    fn missing_owner_key_is_explained() {
        let vars = &minimal()[..2];
        let err = Config::load_with_env(None, &env(vars))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("owner_key") && err.contains("Client ID"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // The production template needs secrets from the environment.
        Config::load_with_env(Some(&root.join("config/dinghook.toml")), &env(&minimal())).unwrap();
        // The development config runs as it is.
        Config::load_with_env(Some(&root.join("config/dev.toml")), &env(&[])).unwrap();
    }

    #[test]
    fn a_bad_file_value_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[store]\nmax_batch = \"lots\"\n").unwrap();
        let err = Config::load_with_env(Some(&path), &env(&minimal()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.toml") && err.contains("store.max_batch") && err.contains("lots"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listne = \"x\"\n").unwrap();
        let err = Config::load_with_env(Some(&path), &env(&minimal())).unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn redacted_output_hides_secrets_and_passwords() {
        let mut vars = minimal();
        vars.push(("DINGHOOK_STORE_URL", "postgres://u:hunter2@db/x"));
        let c = Config::load_with_env(None, &env(&vars)).unwrap();
        let shown = c.to_redacted_toml();
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("\"tok\""), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }
}
