//! `[[routes]]`: what each route takes and where it sends it, validated into [`RouteSpec`]s.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::signing::{SigningKey, SECRET_PREFIX};
use crate::secret::Secret;

/// A route that cannot be used as written: the key (`routes.crm.secret`) and why. Never
/// contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct RouteConfigError {
    pub key: String,
    pub message: String,
}

type ConfigError = RouteConfigError;

/// `[a-z0-9_-]{1,32}`, as app names.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One `[[routes]]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `[a-z0-9_-]{1,32}`, unique: names the route in its deliveries, metrics and commands.
    pub name: String,
    /// The apps whose events it takes; empty: every app.
    #[serde(default, deserialize_with = "crate::setting::list_or_csv")]
    pub apps: Vec<String>,
    /// Globs on the event type (`todo_task_*`); empty: every type.
    #[serde(default, deserialize_with = "crate::setting::list_or_csv")]
    pub events: Vec<String>,
    /// The destination: `http(s)://…` (signed webhook), `nats://…` (JetStream),
    /// `amqp(s)://…` (RabbitMQ), `redis(s)://…` (Redis Streams).
    pub url: String,
    /// HTTP: the Standard Webhooks signing secret (`whsec_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// HTTP: several secrets during a rotation (one signature each).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::setting::secret_list"
    )]
    pub secrets: Vec<Secret>,
    /// HTTP: a file holding the secret (or one per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// HTTP: headers sent with every request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Longest wait for the destination's confirmation of one message.
    #[serde(default = "default_timeout", with = "crate::time::duration_str")]
    pub timeout: Duration,
    /// Messages in flight at once.
    #[serde(
        default = "default_concurrency",
        deserialize_with = "crate::setting::number"
    )]
    pub concurrency: u32,
    /// Messages per second at most; 0: no limit.
    #[serde(default, deserialize_with = "crate::setting::number")]
    pub rate: u32,
    /// Waits between attempts; after the last, the delivery is dead.
    #[serde(
        default = "default_retry_schedule",
        with = "crate::time::duration_list"
    )]
    pub retry_schedule: Vec<Duration>,
    /// NATS: the subject (`{app}` and `{type}` are replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RabbitMQ: the exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// RabbitMQ: the routing key (`{app}`, `{type}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// Redis: the stream key (`{app}`, `{type}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Redis: trim the stream to about this many entries (`MAXLEN ~`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxlen: Option<u64>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_concurrency() -> u32 {
    8
}

/// Like the dispatcher's: quick at first, then spread over about a day.
pub fn default_retry_schedule() -> Vec<Duration> {
    [5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

/// Where a route sends, resolved.
#[derive(Debug, Clone)]
pub enum Target {
    Webhook {
        url: String,
        keys: Vec<SigningKey>,
        headers: BTreeMap<String, String>,
    },
    Nats {
        url: String,
        subject: String,
    },
    Amqp {
        url: String,
        exchange: String,
        routing_key: String,
    },
    Redis {
        url: String,
        stream: String,
        maxlen: Option<u64>,
    },
}

impl Target {
    /// `http`, `nats`, `amqp`, `redis`: the kind, for listings and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Webhook { .. } => "http",
            Target::Nats { .. } => "nats",
            Target::Amqp { .. } => "amqp",
            Target::Redis { .. } => "redis",
        }
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    /// `None`: every app.
    pub apps: Option<BTreeSet<String>>,
    events: GlobSet,
    /// The globs as written (empty: every type).
    pub event_patterns: Vec<String>,
    pub target: Target,
    pub timeout: Duration,
    pub concurrency: u32,
    pub rate: u32,
    pub retry_schedule: Vec<Duration>,
    /// The URL with any password hidden, for listings and logs.
    pub shown_url: String,
}

impl RouteSpec {
    /// Whether the route takes an event of `event_type` that came to `app`.
    pub fn matches(&self, app: &str, event_type: &str) -> bool {
        self.apps.as_ref().is_none_or(|apps| apps.contains(app))
            && (self.event_patterns.is_empty() || self.events.is_match(event_type))
    }
}

/// The routes of a configuration, in the order written.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub specs: Vec<RouteSpec>,
}

impl Routes {
    /// The names of the routes that take an event of `event_type` that came to `app`.
    pub fn matching(&self, app: &str, event_type: &str) -> Vec<String> {
        self.specs
            .iter()
            .filter(|r| r.matches(app, event_type))
            .map(|r| r.name.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&RouteSpec> {
        self.specs.iter().find(|r| r.name == name)
    }
}

fn bad(route: &str, key: &str, message: impl Into<String>) -> ConfigError {
    RouteConfigError {
        key: format!("routes.{route}.{key}"),
        message: message.into(),
    }
}

/// Validates `routes` against the configured `apps`.
pub fn resolve(routes: &[RouteConfig], apps: &[&str]) -> Result<Routes, ConfigError> {
    let mut names = HashSet::new();
    let mut specs = Vec::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        if !valid_name(&route.name) {
            return Err(RouteConfigError {
                key: format!("routes[{i}].name"),
                message: format!(
                    "{:?} is not a route name: 1 to 32 of a-z 0-9 _ -",
                    route.name
                ),
            });
        }
        if !names.insert(route.name.as_str()) {
            return Err(bad(&route.name, "name", "two routes have this name"));
        }
        specs.push(resolve_one(route, apps)?);
    }
    Ok(Routes { specs })
}

fn resolve_one(route: &RouteConfig, apps: &[&str]) -> Result<RouteSpec, ConfigError> {
    let name = route.name.as_str();
    let wanted = if route.apps.is_empty() {
        None
    } else {
        for app in &route.apps {
            if !apps.contains(&app.as_str()) {
                return Err(bad(
                    name,
                    "apps",
                    format!("no app named {app:?} is configured"),
                ));
            }
        }
        Some(route.apps.iter().cloned().collect())
    };
    let mut globs = GlobSetBuilder::new();
    for pattern in &route.events {
        let glob = Glob::new(pattern).map_err(|e| {
            bad(
                name,
                "events",
                format!("{pattern:?} is not a glob: {}", e.kind()),
            )
        })?;
        globs.add(glob);
    }
    let events = globs
        .build()
        .map_err(|e| bad(name, "events", e.to_string()))?;
    if route.concurrency == 0 || route.concurrency > 1024 {
        return Err(bad(name, "concurrency", "must be 1 to 1024"));
    }
    if route.timeout.is_zero() || route.timeout > Duration::from_secs(300) {
        return Err(bad(name, "timeout", "must be more than 0 and at most 5m"));
    }
    if route.retry_schedule.len() > 100 {
        return Err(bad(name, "retry_schedule", "at most 100 waits"));
    }
    let scheme = route
        .url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    let only = |allowed: &[&str]| -> Result<(), ConfigError> {
        let given = [
            ("secret", route.secret.is_some()),
            ("secrets", !route.secrets.is_empty()),
            ("secret_file", route.secret_file.is_some()),
            ("headers", !route.headers.is_empty()),
            ("subject", route.subject.is_some()),
            ("exchange", route.exchange.is_some()),
            ("routing_key", route.routing_key.is_some()),
            ("stream", route.stream.is_some()),
            ("maxlen", route.maxlen.is_some()),
        ];
        match given.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            Some((key, _)) => Err(bad(
                name,
                key,
                format!("does not apply to a {scheme}:// route"),
            )),
            None => Ok(()),
        }
    };
    let target = match scheme.as_str() {
        "http" | "https" => {
            only(&["secret", "secrets", "secret_file", "headers"])?;
            reqwest::Url::parse(&route.url)
                .map_err(|e| bad(name, "url", format!("not a URL: {e}")))?;
            let keys = signing_keys(route)?;
            Target::Webhook {
                url: route.url.clone(),
                keys,
                headers: route.headers.clone(),
            }
        }
        "nats" | "tls" => {
            only(&["subject"])?;
            Target::Nats {
                url: route.url.clone(),
                subject: route
                    .subject
                    .clone()
                    .unwrap_or_else(|| "dinghook.{app}.{type}".into()),
            }
        }
        "amqp" | "amqps" => {
            only(&["exchange", "routing_key"])?;
            Target::Amqp {
                url: route.url.clone(),
                exchange: route.exchange.clone().unwrap_or_else(|| "dinghook".into()),
                routing_key: route
                    .routing_key
                    .clone()
                    .unwrap_or_else(|| "{app}.{type}".into()),
            }
        }
        "redis" | "rediss" => {
            only(&["stream", "maxlen"])?;
            Target::Redis {
                url: route.url.clone(),
                stream: route
                    .stream
                    .clone()
                    .unwrap_or_else(|| "dinghook:{app}".into()),
                maxlen: route.maxlen,
            }
        }
        _ => {
            return Err(bad(
                name,
                "url",
                format!(
                    "unknown scheme {:?}: use http(s)://, nats://, amqp(s):// or redis(s)://",
                    scheme
                ),
            ))
        }
    };
    Ok(RouteSpec {
        name: name.to_owned(),
        apps: wanted,
        events,
        event_patterns: route.events.clone(),
        target,
        timeout: route.timeout,
        concurrency: route.concurrency,
        rate: route.rate,
        retry_schedule: route.retry_schedule.clone(),
        shown_url: shown_url(&route.url),
    })
}

/// The URL with its secret hidden: a password (`user:***@`), or a NATS token (`***@`).
fn shown_url(url: &str) -> String {
    let redacted = crate::store::redact_url(url);
    if let (Some(scheme_end), Some(at)) = (redacted.find("://"), redacted.rfind('@')) {
        let userinfo = &redacted[scheme_end + 3..at];
        let nats = matches!(&redacted[..scheme_end], "nats" | "tls");
        if nats && !userinfo.is_empty() && !userinfo.contains(':') {
            return format!("{}***{}", &redacted[..scheme_end + 3], &redacted[at..]);
        }
    }
    redacted
}

/// The route's signing keys: `secret`, `secrets` and the lines of `secret_file`.
fn signing_keys(route: &RouteConfig) -> Result<Vec<SigningKey>, ConfigError> {
    let name = route.name.as_str();
    let mut secrets: Vec<(&'static str, Secret)> = Vec::new();
    if let Some(secret) = &route.secret {
        secrets.push(("secret", secret.clone()));
    }
    secrets.extend(route.secrets.iter().map(|s| ("secrets", s.clone())));
    if let Some(path) = &route.secret_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(
                name,
                "secret_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        secrets.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| ("secret_file", Secret::new(l))),
        );
    }
    if secrets.is_empty() {
        return Err(bad(
            name,
            "secret",
            format!(
                "an HTTP route signs what it sends: set secret = \"{SECRET_PREFIX}…\" \
                 (or secrets, or secret_file)"
            ),
        ));
    }
    secrets
        .iter()
        .map(|(key, secret)| SigningKey::parse(secret).map_err(|e| bad(name, key, e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn routes(toml_text: &str) -> Result<Routes, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            routes: Vec<RouteConfig>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        resolve(&file.routes, &["default", "ops"])
    }

    fn error(toml_text: &str) -> String {
        routes(toml_text).unwrap_err().to_string()
    }

    #[test]
    fn the_issue_example_resolves() {
        let r = routes(&format!(
            r#"
[[routes]]
name = "crm"
apps = ["ops"]
events = ["todo_task_*", "chat_update_title"]
url = "https://crm.example.com/hooks/dingtalk"
secret = "{SECRET}"
headers = {{ "X-Team" = "ops" }}
timeout = "10s"
concurrency = 8
rate = 50

[[routes]]
name = "bus"
url = "nats://127.0.0.1:4222"
subject = "dinghook.{{app}}.{{type}}"

[[routes]]
name = "mq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange = "dinghook"
routing_key = "{{app}}.{{type}}"

[[routes]]
name = "stream"
url = "redis://127.0.0.1:6379"
stream = "dinghook:{{app}}"
"#
        ))
        .unwrap();
        let kinds: Vec<&str> = r.specs.iter().map(|s| s.target.kind()).collect();
        assert_eq!(kinds, ["http", "nats", "amqp", "redis"]);
        assert_eq!(
            r.matching("ops", "todo_task_create"),
            ["crm", "bus", "mq", "stream"]
        );
        assert_eq!(
            r.matching("default", "todo_task_create"),
            ["bus", "mq", "stream"]
        );
        assert_eq!(
            r.matching("ops", "chat_update_title"),
            ["crm", "bus", "mq", "stream"]
        );
        assert_eq!(
            r.matching("ops", "attendance_check_record"),
            ["bus", "mq", "stream"]
        );
        assert_eq!(
            r.get("mq").unwrap().shown_url,
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            shown_url("nats://s3cr3t@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(shown_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn bad_routes_are_refused_naming_the_route_and_key() {
        let cases = [
            ("name = \"Bad Name\"\nurl = \"nats://x\"", "routes[0].name"),
            ("name = \"a\"\nurl = \"ftp://x\"", "routes.a.url"),
            (
                "name = \"a\"\nurl = \"nats://x\"\napps = [\"nope\"]",
                "routes.a.apps",
            ),
            (
                "name = \"a\"\nurl = \"nats://x\"\nevents = [\"todo_[\"]",
                "routes.a.events",
            ),
            ("name = \"a\"\nurl = \"https://x\"", "routes.a.secret"),
            (
                "name = \"a\"\nurl = \"https://x\"\nsecret = \"hunter2\"",
                "routes.a.secret",
            ),
            (
                "name = \"a\"\nurl = \"nats://x\"\nsecret = \"whsec_x\"",
                "routes.a.secret",
            ),
            (
                "name = \"a\"\nurl = \"redis://x\"\nsubject = \"s\"",
                "routes.a.subject",
            ),
            (
                "name = \"a\"\nurl = \"nats://x\"\nconcurrency = 0",
                "routes.a.concurrency",
            ),
        ];
        for (table, key) in cases {
            let message = error(&format!("[[routes]]\n{table}\n"));
            assert!(message.starts_with(key), "{table}: {message}");
        }
        let twice = error("[[routes]]\nname = \"a\"\nurl = \"nats://x\"\n[[routes]]\nname = \"a\"\nurl = \"nats://y\"\n");
        assert!(twice.contains("two routes"), "{twice}");
        // A bad secret's error does not show it.
        let message =
            error("[[routes]]\nname = \"a\"\nurl = \"https://x\"\nsecret = \"hunter2\"\n");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn secrets_come_from_a_file_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{SECRET}\n{SECRET}\n")).unwrap();
        let r = routes(&format!(
            "[[routes]]\nname = \"a\"\nurl = \"https://x\"\nsecret_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        let Target::Webhook { keys, .. } = &r.specs[0].target else {
            panic!()
        };
        assert_eq!(keys.len(), 2);
    }
}
