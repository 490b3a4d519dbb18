//! `[apps.NAME]`: several DingTalk apps in one deployment, each with its own callback path,
//! keys, DingTalk client, handler options and recovery.
//!
//! An app's table holds its callback keys (`callback_path`, `token`, `aes_key`,
//! `previous_aes_keys`, `owner_key`, each secret also as `<key>_file`), any `[dingtalk]` key
//! (`app_key`, `app_secret`/`app_secret_file`, `agent_id`, `qps`, `oapi_url`, …) and the
//! sub-tables `handlers` and `recovery`. What it does not set comes from the top-level
//! sections, except the identity of the top-level app (its AppKey, AppSecret and AgentId),
//! which is never lent to another app. The top-level `[callback]` + `[dingtalk]` keys are the
//! app named `default` at `callback.path`, as they were before apps existed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;
use figment::Provider;
use serde::{Deserialize, Serialize};

use super::{check_literal_path, describe, ConfigError};
use crate::builtin::HandlersConfig;
use crate::crypto::{AesKey, CallbackCipher};
use crate::dingtalk::ClientConfig;
use crate::secret::Secret;
use crate::sources::push::CallbackConfig;
use crate::sources::recovery::RecoveryConfig;
use crate::sources::stream::StreamConfig;

/// The app the top-level `[callback]` and `[dingtalk]` keys make.
pub const DEFAULT_APP: &str = "default";

/// One app, resolved: everything it needs to receive and act.
#[derive(Debug, Clone, Serialize)]
pub struct AppSpec {
    pub name: String,
    /// Made from the top-level keys (so errors name `callback.token`, `dingtalk.qps`, …).
    #[serde(skip)]
    top_level: bool,
    /// Its path, keys and owner key; the body limits, replay window and trusted proxies are
    /// the top-level `[callback]`'s.
    pub callback: CallbackConfig,
    pub dingtalk: ClientConfig,
    pub handlers: HandlersConfig,
    pub recovery: RecoveryConfig,
    /// Stream mode: `stream = true` in the app's table (the top-level `[stream] enabled` for
    /// the `default` app); the knobs from `[stream]` unless the app's `[apps.NAME.stream]`
    /// sets them.
    pub stream: StreamConfig,
    /// `[retention]`, with `done` and `dead` from `[apps.NAME.retention]` where it sets them.
    pub retention: crate::retention::RetentionConfig,
}

impl AppSpec {
    /// The callback cipher of this app's keys (validated by [`resolve`]).
    pub fn cipher(&self) -> Result<CallbackCipher, ConfigError> {
        let c = &self.callback;
        let previous: Vec<String> = c
            .previous_aes_keys
            .iter()
            .map(|s| s.expose().to_owned())
            .collect();
        CallbackCipher::from_strings(
            c.token.expose(),
            c.aes_key.expose(),
            &previous,
            &c.owner_key,
        )
        .map_err(|e| self.invalid("aes_key", e.to_string()))
    }

    /// How many metered calls a month the app's failed-push reads make, when that is more than
    /// half its monthly quota (so the start-up can warn); `None` otherwise.
    pub fn recovery_quota_share(&self) -> Option<(u64, u64)> {
        if !self.recovery.enabled || !self.dingtalk_enabled() {
            return None;
        }
        let month = 30 * 86_400_000_u64;
        let per_month = month / (crate::time::millis(self.recovery.interval).max(1) as u64);
        (per_month * 2 > self.dingtalk.monthly_quota)
            .then_some((per_month, self.dingtalk.monthly_quota))
    }

    /// Whether `other` has this app's settings, secrets included: a reload keeps what did not
    /// change.
    pub fn same_as(&self, other: &AppSpec) -> bool {
        self.name == other.name
            && settings(self) == settings(other)
            && self.secrets().eq(other.secrets())
    }

    /// Whether `other` would make the same DingTalk client (so its token and limiter can be
    /// kept).
    pub fn same_client(&self, other: &AppSpec) -> bool {
        serde_json::to_value(&self.dingtalk).ok() == serde_json::to_value(&other.dingtalk).ok()
            && self.dingtalk.app_secret == other.dingtalk.app_secret
    }

    /// Whether `other` reads DingTalk's failed-push list the same way (same client, same
    /// schedule).
    pub fn same_recovery(&self, other: &AppSpec) -> bool {
        self.same_client(other)
            && serde_json::to_value(&self.recovery).ok()
                == serde_json::to_value(&other.recovery).ok()
    }

    /// Whether `other` runs the same Stream client (same switch, knobs and credentials).
    pub fn same_stream(&self, other: &AppSpec) -> bool {
        self.stream == other.stream
            && self.dingtalk.app_key == other.dingtalk.app_key
            && self.dingtalk.app_secret == other.dingtalk.app_secret
            && self.dingtalk.api_url == other.dingtalk.api_url
    }

    /// True when the app receives HTTP pushes: it has callback keys. An app in Stream mode may
    /// go without them (no callback route then).
    pub fn push_enabled(&self) -> bool {
        !(self.stream.enabled && self.callback.token.is_empty() && self.callback.aes_key.is_empty())
    }

    /// The secret values, which the serialized settings show redacted.
    fn secrets(&self) -> impl Iterator<Item = &Secret> {
        let c = &self.callback;
        [&c.token, &c.aes_key, &self.dingtalk.app_secret]
            .into_iter()
            .chain(&c.previous_aes_keys)
    }

    /// True when the app has an AppKey, so it has a DingTalk client.
    pub fn dingtalk_enabled(&self) -> bool {
        !self.dingtalk.app_key.trim().is_empty()
    }

    /// An error about `key` of this app's table (`token`, `qps`, `recovery.interval`, …), named
    /// as the user wrote it.
    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        if !self.top_level {
            return app_invalid(&self.name, key, message);
        }
        let top = match key {
            "callback_path" => "callback.path".to_owned(),
            "token" | "aes_key" | "previous_aes_keys" | "owner_key" => format!("callback.{key}"),
            k if k.starts_with("handlers")
                || k.starts_with("recovery")
                || k.starts_with("stream")
                || k.starts_with("retention") =>
            {
                k.to_owned()
            }
            other => format!("dingtalk.{other}"),
        };
        super::invalid(&top, message)
    }
}

/// An app's settings as they serialize (secrets redacted, hence [`AppSpec::same_as`]'s own
/// look at them).
fn settings(app: &AppSpec) -> Option<serde_json::Value> {
    serde_json::to_value(app).ok()
}

/// An error about `apps.<app>.<key>`, naming its environment variable.
pub(super) fn app_invalid(app: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("apps.{app}.{key}"),
        env: env_var(app, key),
        message: message.into(),
    }
}

/// `DINGHOOK_APPS__<NAME>__<KEY>` (upper-cased, `-` and `.` as `_` and `__`).
pub fn env_var(app: &str, key: &str) -> String {
    let part = |s: &str| s.to_ascii_uppercase().replace('-', "_");
    let key = key.split('.').map(part).collect::<Vec<_>>().join("__");
    format!("DINGHOOK_APPS__{}__{}", part(app), key)
}

/// The environment prefix of app keys.
pub const ENV_PREFIX: &str = "DINGHOOK_APPS__";

/// The callback keys an app's table may hold; the rest are `[dingtalk]` keys or sub-tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackKeys {
    callback_path: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    aes_key: Option<Secret>,
    aes_key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "optional_secret_list")]
    previous_aes_keys: Option<Vec<Secret>>,
    previous_aes_keys_file: Option<PathBuf>,
    owner_key: Option<String>,
    app_secret_file: Option<PathBuf>,
}

fn optional_secret_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Secret>>, D::Error> {
    crate::setting::secret_list(d).map(Some)
}

const CALLBACK_KEYS: &[&str] = &[
    "callback_path",
    "token",
    "token_file",
    "aes_key",
    "aes_key_file",
    "previous_aes_keys",
    "previous_aes_keys_file",
    "owner_key",
    "app_secret_file",
];

/// The `[dingtalk]` keys that are an app's identity: never inherited from the top level.
const IDENTITY_KEYS: &[&str] = &["app_key", "app_secret", "agent_id"];

/// Paths the public listener answers itself.
const RESERVED_PATHS: &[&str] = &["/healthz", "/readyz"];

/// Whether `name` is a valid app name: `[a-z0-9_-]{1,32}`.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Every app of `config`: the `default` app from the top-level keys (when `callback.token` is
/// set, or when no `[apps.*]` exists, so a single-app configuration is checked as before),
/// then each `[apps.NAME]` by name. Secret files are read here. Checks each app's keys, and
/// that no two apps share a path.
pub(super) fn resolve(config: &super::Config) -> Result<Vec<AppSpec>, ConfigError> {
    let mut apps = Vec::new();
    let has_default =
        !config.callback.token.is_empty() || config.apps.is_empty() || config.stream.enabled;
    if has_default {
        let default = AppSpec {
            name: DEFAULT_APP.to_owned(),
            top_level: true,
            callback: config.callback.clone(),
            dingtalk: config.dingtalk.clone(),
            handlers: config.handlers.clone(),
            recovery: config.recovery.clone(),
            stream: config.stream.clone(),
            retention: config.retention.clone(),
        };
        check_keys(&default)?;
        apps.push(default);
    }
    for (name, table) in &config.apps {
        if !valid_name(name) {
            return Err(app_invalid(
                name,
                "",
                "is not a valid app name: 1 to 32 of a-z, 0-9, _ and -",
            ));
        }
        if name == DEFAULT_APP && has_default {
            return Err(app_invalid(
                name,
                "",
                "the top-level [callback] keys already make the app \"default\"; \
                 move them into [apps.default] or rename this app",
            ));
        }
        apps.push(resolve_one(config, name, table)?);
    }
    let mut paths: BTreeMap<&str, &str> = BTreeMap::new();
    for app in &apps {
        if let Some(other) = paths.insert(&app.callback.path, &app.name) {
            return Err(app.invalid(
                "callback_path",
                format!(
                    "{:?} is also the path of app {other:?}; each app needs its own",
                    app.callback.path
                ),
            ));
        }
    }
    Ok(apps)
}

/// The checks every app's own keys get (the top-level `default` app names them as
/// `callback.*`/`dingtalk.*`).
fn check_keys(app: &AppSpec) -> Result<(), ConfigError> {
    let c = &app.callback;
    if let Err(e) = check_literal_path("callback_path", &c.path) {
        let ConfigError::Invalid { message, .. } = e else {
            return Err(e);
        };
        return Err(app.invalid("callback_path", message));
    }
    if RESERVED_PATHS.contains(&c.path.as_str()) {
        return Err(app.invalid(
            "callback_path",
            format!("{:?} is answered by dinghook itself", c.path),
        ));
    }
    if app.push_enabled() {
        check_push_keys(app)?;
    }
    super::check_client_ranges(app)?;
    if app.dingtalk_enabled() {
        app.dingtalk
            .validate()
            .map_err(|m| app.invalid("app_key", m))?;
    } else if !app.dingtalk.app_secret.is_empty() {
        return Err(app.invalid(
            "app_key",
            "is empty while app_secret is set: set both or neither",
        ));
    }
    if app.stream.enabled && (!app.dingtalk_enabled() || app.dingtalk.app_secret.is_empty()) {
        return Err(app.invalid(
            "app_key",
            "Stream mode is on but the app has no app_key and app_secret: set both \
             (the Client ID and Client Secret of the app's credentials page)",
        ));
    }
    app.handlers
        .validate()
        .map_err(|m| app.invalid("handlers", m))?;
    Ok(())
}

/// The HTTP Push callback's keys (see [`check_keys`]).
fn check_push_keys(app: &AppSpec) -> Result<(), ConfigError> {
    let c = &app.callback;
    if c.token.is_empty() {
        return Err(app.invalid(
            "token",
            "is required: the token from the DingTalk console's event subscription page",
        ));
    }
    if c.aes_key.is_empty() {
        return Err(app.invalid(
            "aes_key",
            "is required: the 43-character aes_key from the DingTalk console",
        ));
    }
    AesKey::parse(c.aes_key.expose()).map_err(|e| app.invalid("aes_key", e.to_string()))?;
    for (i, key) in c.previous_aes_keys.iter().enumerate() {
        AesKey::parse(key.expose())
            .map_err(|e| app.invalid("previous_aes_keys", format!("entry {}: {e}", i + 1)))?;
    }
    if c.owner_key.is_empty() {
        return Err(app.invalid(
            "owner_key",
            "is required: the app key / Client ID (console subscriptions), the corp id \
             (register_call_back API) or the suite key (third-party apps)",
        ));
    }
    Ok(())
}

fn resolve_one(config: &super::Config, name: &str, table: &Value) -> Result<AppSpec, ConfigError> {
    let Some(table) = table.as_dict() else {
        return Err(app_invalid(name, "", "must be a table of keys"));
    };
    let (mut own, mut client, mut sections) = (Dict::new(), Dict::new(), Dict::new());
    for (key, value) in table {
        let part = if CALLBACK_KEYS.contains(&key.as_str()) {
            &mut own
        } else if key == "handlers" || key == "recovery" || key == "stream" || key == "retention" {
            &mut sections
        } else {
            &mut client
        };
        part.insert(key.clone(), value.clone());
    }
    let keys: CallbackKeys = Figment::from(Serialized::defaults(&own))
        .extract()
        .map_err(|e| app_invalid(name, &e.path.join("."), describe(&e)))?;

    let mut callback = config.callback.clone();
    callback.path = keys
        .callback_path
        .clone()
        .unwrap_or_else(|| format!("/dingtalk/callback/{name}"));
    callback.token = secret(name, "token", keys.token, keys.token_file.as_ref())?;
    callback.aes_key = secret(name, "aes_key", keys.aes_key, keys.aes_key_file.as_ref())?;
    callback.previous_aes_keys = match (&keys.previous_aes_keys, &keys.previous_aes_keys_file) {
        (Some(_), Some(_)) => return Err(both(name, "previous_aes_keys")),
        (Some(list), None) => list.clone(),
        (None, Some(path)) => read_secret(name, "previous_aes_keys_file", path)?
            .expose()
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect(),
        (None, None) => Vec::new(),
    };
    callback.owner_key = keys.owner_key.clone().unwrap_or_default();

    // The top-level [dingtalk] without its identity, then the app's own keys.
    let mut inherited = dict_of(&config.dingtalk)?;
    for key in IDENTITY_KEYS {
        inherited.remove(*key);
    }
    let mut dingtalk: ClientConfig = Figment::from(Serialized::defaults(inherited))
        .merge(Serialized::defaults(&client))
        .extract()
        .map_err(|e| app_invalid(name, &e.path.join("."), describe(&e)))?;
    match (&keys.app_secret_file, client.contains_key("app_secret")) {
        (Some(_), true) => return Err(both(name, "app_secret")),
        (Some(path), false) => dingtalk.app_secret = read_secret(name, "app_secret_file", path)?,
        _ => {}
    }

    let handlers: HandlersConfig = Figment::from(Serialized::defaults(dict_of(&config.handlers)?))
        .merge(Serialized::defaults(section(&sections, "handlers")))
        .extract()
        .map_err(|e| {
            app_invalid(
                name,
                &format!("handlers.{}", e.path.join(".")),
                describe(&e),
            )
        })?;
    let recovery: RecoveryConfig = Figment::from(Serialized::defaults(dict_of(&config.recovery)?))
        .merge(Serialized::defaults(section(&sections, "recovery")))
        .extract()
        .map_err(|e| {
            app_invalid(
                name,
                &format!("recovery.{}", e.path.join(".")),
                describe(&e),
            )
        })?;

    // `stream = true` or a `[apps.NAME.stream]` table over the top-level knobs; the top-level
    // `enabled` is the default app's and is not lent.
    let mut inherited_stream = dict_of(&config.stream)?;
    inherited_stream.remove("enabled");
    let own_stream = match sections.get("stream") {
        Some(Value::Dict(_, table)) => table.clone(),
        Some(switch) => Dict::from([("enabled".to_owned(), switch.clone())]),
        None => Dict::new(),
    };
    let stream: StreamConfig = Figment::from(Serialized::defaults(inherited_stream))
        .merge(Serialized::defaults(own_stream))
        .extract()
        .map_err(|e| {
            let key = if e.path.is_empty() || e.path == ["enabled"] {
                "stream".to_owned()
            } else {
                format!("stream.{}", e.path.join("."))
            };
            app_invalid(name, &key, describe(&e))
        })?;

    // Only how long its events are kept is the app's own; the rest is every app's.
    let own_retention = section(&sections, "retention");
    if let Some(key) = own_retention
        .keys()
        .find(|k| !matches!(k.as_str(), "done" | "dead"))
    {
        return Err(app_invalid(
            name,
            &format!("retention.{key}"),
            "only done and dead may be set per app; the rest is [retention]'s",
        ));
    }
    let retention: crate::retention::RetentionConfig =
        Figment::from(Serialized::defaults(dict_of(&config.retention)?))
            .merge(Serialized::defaults(own_retention))
            .extract()
            .map_err(|e| {
                app_invalid(
                    name,
                    &format!("retention.{}", e.path.join(".")),
                    describe(&e),
                )
            })?;
    if let Err((key, message)) = retention.check() {
        return Err(app_invalid(name, &format!("retention.{key}"), message));
    }

    let app = AppSpec {
        name: name.to_owned(),
        top_level: false,
        callback,
        dingtalk,
        handlers,
        recovery,
        stream,
        retention,
    };
    check_keys(&app)?;
    Ok(app)
}

fn section(sections: &Dict, name: &str) -> Dict {
    sections
        .get(name)
        .and_then(Value::as_dict)
        .cloned()
        .unwrap_or_default()
}

/// A section as figment values, to layer an app's keys over. Only sections without secrets
/// (or with their secrets removed after) come through here: a `Secret` serializes redacted.
fn dict_of(section: &impl Serialize) -> Result<Dict, ConfigError> {
    Serialized::defaults(section)
        .data()
        .ok()
        .and_then(|mut profiles| profiles.remove(&figment::Profile::Default))
        .ok_or_else(|| super::invalid("apps", "could not layer the top-level sections"))
}

fn both(app: &str, key: &str) -> ConfigError {
    app_invalid(app, key, format!("set {key} or {key}_file, not both"))
}

fn secret(
    app: &str,
    key: &str,
    value: Option<Secret>,
    file: Option<&PathBuf>,
) -> Result<Secret, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(both(app, key)),
        (Some(value), None) => Ok(value),
        (None, Some(path)) => read_secret(app, &format!("{key}_file"), path),
        (None, None) => Ok(Secret::default()),
    }
}

/// A secret from a file (the Docker and Kubernetes secrets convention): its content without
/// the trailing newline. The error names the file, never its content.
fn read_secret(app: &str, key: &str, path: &PathBuf) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| app_invalid(app, key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}

/// The `apps` part of the environment: `DINGHOOK_APPS__<NAME>__<KEY>[__<SUBKEY>…]` → the
/// dotted key `apps.<name>.<key>…`. A name is matched to the file's app whose upper-cased
/// name (with `-` as `_`) it is; otherwise it is the lower-cased name.
pub(super) fn from_environment(
    vars: &[(String, String)],
    file_apps: &[String],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (var, value) in vars {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let mut parts = rest.split("__");
        let (Some(name), Some(_)) = (parts.next(), parts.clone().next()) else {
            continue;
        };
        let name = file_apps
            .iter()
            .find(|app| app.to_ascii_uppercase().replace('-', "_") == name)
            .cloned()
            .unwrap_or_else(|| name.to_ascii_lowercase());
        let key: Vec<String> = parts.map(str::to_ascii_lowercase).collect();
        out.push((format!("apps.{name}.{}", key.join(".")), value.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const KEY_A: &str = "1234567890123456789012345678901234567890123";
    const KEY_B: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dinghook.toml");
        std::fs::write(&path, toml).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(Some(&path), &env)
    }

    fn two_apps(extra: &str) -> String {
        format!(
            r#"
[callback]
token = "top-token"
aes_key = "{KEY_A}"
owner_key = "dingtop"
[dingtalk]
app_key = "dingtop"
app_secret = "top-secret"
agent_id = 1
oapi_url = "http://dedicated.example"
qps = 7
[handlers.todo]
enabled = false
[apps.ops]
token = "ops-token"
aes_key = "{KEY_B}"
owner_key = "dingops"
app_key = "dingops"
app_secret = "ops-secret"
monthly_quota = 9000
[apps.ops.recovery]
interval = "2h"
{extra}"#
        )
    }

    #[test]
    fn apps_inherit_settings_but_never_the_top_level_identity() {
        let config = load(&two_apps(""), &[]).unwrap();
        let apps = config.apps().unwrap();
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["default", "ops"]);
        let ops = &apps[1];
        assert_eq!(ops.callback.path, "/dingtalk/callback/ops");
        assert_eq!(ops.callback.token.expose(), "ops-token");
        assert_eq!(ops.dingtalk.app_key, "dingops");
        assert_eq!(ops.dingtalk.app_secret.expose(), "ops-secret");
        assert_eq!(
            ops.dingtalk.agent_id, None,
            "the top-level AgentId is not lent"
        );
        assert_eq!(ops.dingtalk.oapi_url, "http://dedicated.example");
        assert_eq!(ops.dingtalk.qps, 7);
        assert_eq!(ops.dingtalk.monthly_quota, 9000);
        assert!(!ops.handlers.todo.enabled, "handler options are inherited");
        assert_eq!(ops.recovery.interval, std::time::Duration::from_secs(7200));
        let default = &apps[0];
        assert_eq!(default.callback.path, "/dingtalk/callback");
        assert_eq!(default.dingtalk.app_key, "dingtop");
        assert!(ops.cipher().is_ok() && default.cipher().is_ok());
    }

    #[test]
    fn an_app_keeps_its_events_as_long_as_it_says_and_nothing_else_is_its_own() {
        let day = std::time::Duration::from_secs(86_400);
        let extra = "[retention]\ndone = \"3d\"\n[apps.ops.retention]\ndead = \"90d\"\n";
        let config = load(&two_apps(extra), &[("DINGHOOK_RETENTION_AUDIT", "0")]).unwrap();
        let apps = config.apps().unwrap();
        let (default, ops) = (&apps[0].retention, &apps[1].retention);
        assert_eq!((default.done, default.dead), (3 * day, 30 * day));
        assert_eq!((ops.done, ops.dead), (3 * day, 90 * day), "done inherited");
        assert!(config.retention.audit.is_zero());
        let error = load(&two_apps("[apps.ops.retention]\ninterval = \"5s\"\n"), &[])
            .and_then(|c| c.apps())
            .unwrap_err()
            .to_string();
        assert!(error.contains("apps.ops.retention.interval"), "{error}");
        let error = load(&two_apps("[apps.ops.retention]\ndone = \"1h\"\n"), &[])
            .and_then(|c| c.apps())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("apps.ops.retention.done") && error.contains("24h"),
            "{error}"
        );
        let error = load(&two_apps(""), &[("DINGHOOK_RETENTION_DONE", "10m")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("retention.done"), "{error}");
    }

    #[test]
    fn secrets_come_from_files_and_app_keys_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "file-token\n").unwrap();
        let toml = format!(
            r#"
[apps.ops-eu]
token_file = "{}"
owner_key = "dingeu"
"#,
            token.display()
        );
        let config = load(
            &toml,
            &[
                ("DINGHOOK_APPS__OPS_EU__AES_KEY", KEY_A),
                ("DINGHOOK_APPS__OPS_EU__QPS", "3"),
                ("DINGHOOK_APPS__NEW__TOKEN", "t"),
                ("DINGHOOK_APPS__NEW__AES_KEY", KEY_B),
                ("DINGHOOK_APPS__NEW__OWNER_KEY", "dingnew"),
                ("DINGHOOK_APPS__NEW__HANDLERS__TODO__ENABLED", "off"),
            ],
        )
        .unwrap();
        let apps = config.apps().unwrap();
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            ["new", "ops-eu"],
            "no default app without top-level keys"
        );
        assert_eq!(apps[1].callback.token.expose(), "file-token");
        assert_eq!(apps[1].callback.aes_key.expose(), KEY_A);
        assert_eq!(apps[1].dingtalk.qps, 3);
        assert!(!apps[0].handlers.todo.enabled);
        let shown = config.to_redacted_toml();
        assert!(shown.contains("[apps.ops-eu.callback]"), "{shown}");
        assert!(
            !shown.contains("file-token") && !shown.contains(KEY_A),
            "{shown}"
        );
    }

    fn error(toml_extra: &str, env: &[(&str, &str)]) -> String {
        load(&two_apps(toml_extra), env)
            .and_then(|c| c.apps().map(|_| c))
            .map(|_| "no error".to_owned())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn bad_app_tables_are_refused_naming_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                "[apps.bad]\ntokn = \"x\"\n",
                &[],
                "apps.bad.tokn (DINGHOOK_APPS__BAD__TOKN)",
            ),
            (
                &format!(
                    "[apps.two]\ncallback_path = \"/dingtalk/callback/ops\"\ntoken = \"t\"\naes_key = \"{KEY_A}\"\nowner_key = \"o\"\n"
                ),
                &[],
                "also the path of app \"ops\"",
            ),
            (
                &format!("[apps.Bad]\ntoken = \"t\"\naes_key = \"{KEY_A}\"\nowner_key = \"o\"\n"),
                &[],
                "not a valid app name",
            ),
            (
                "[apps.short]\ntoken = \"t\"\naes_key = \"123456789012345678901234567890123456789012\"\nowner_key = \"o\"\n",
                &[],
                "apps.short.aes_key",
            ),
            (
                "[apps.gone]\ntoken_file = \"/nonexistent/token\"\n",
                &[],
                "apps.gone.token_file (DINGHOOK_APPS__GONE__TOKEN_FILE): cannot read /nonexistent/token",
            ),
            (
                "",
                &[("DINGHOOK_APPS__OPS__TOKEN_FILE", "/etc/hostname")],
                "set token or token_file, not both",
            ),
            (
                "",
                &[("DINGHOOK_APPS__OPS__QPS", "0")],
                "apps.ops.qps (DINGHOOK_APPS__OPS__QPS): 0 is outside 1..=100000",
            ),
            (
                "[apps.default]\ntoken = \"t\"\n",
                &[],
                "already make the app \"default\"",
            ),
            (
                "",
                &[("DINGHOOK_APPS__OPS__CALLBACK_PATH", "/healthz")],
                "answered by dinghook itself",
            ),
        ];
        for (extra, env, expected) in cases {
            let message = error(extra, env);
            assert!(message.contains(expected), "{extra:?} {env:?}: {message}");
            for secret in ["ops-token", "ops-secret", "top-secret", KEY_A, KEY_B] {
                assert!(!message.contains(secret), "{message}");
            }
        }
    }

    #[test]
    fn stream_mode_is_switched_per_app_and_needs_the_credentials() {
        let extra = "[stream]\nconcurrency = 8\n[apps.s]\napp_key = \"dings\"\napp_secret = \"s-secret\"\nstream = true\n[apps.t]\napp_key = \"dingt\"\napp_secret = \"t-secret\"\n[apps.t.stream]\nenabled = \"on\"\nrobot = true\n";
        let config = load(&two_apps(extra), &[]).unwrap();
        let apps = config.apps().unwrap();
        let by = |n: &str| apps.iter().find(|a| a.name == n).unwrap().clone();
        let (s, t, ops) = (by("s"), by("t"), by("ops"));
        assert!(
            s.stream.enabled && !s.push_enabled(),
            "no callback keys: Stream only"
        );
        assert_eq!(s.stream.concurrency, 8, "knobs inherited");
        assert!(t.stream.enabled && t.stream.robot);
        assert!(!ops.stream.enabled && ops.push_enabled());
        assert!(
            !by("default").stream.enabled,
            "the top-level switch is the default app's"
        );
        assert!(!s.same_stream(&t));

        for (extra, env, expected) in [
            ("[apps.s]\nstream = true\n", vec![], "apps.s.app_key (DINGHOOK_APPS__S__APP_KEY): Stream mode is on"),
            ("[apps.s]\napp_key = \"k\"\napp_secret = \"x\"\n[apps.s.stream]\nenabled = true\nconcurrency = 0\n", vec![], "apps.s.stream.concurrency"),
            ("", vec![("DINGHOOK_STREAM_WATCHDOG", "10ms")], "stream.watchdog (DINGHOOK_STREAM_WATCHDOG)"),
            ("[apps.s]\nstream = \"maybe\"\n", vec![], "apps.s.stream"),
        ] {
            let message = error(extra, &env);
            assert!(message.contains(expected), "{extra:?}: {message}");
        }
        // The default app from the environment alone, in Stream mode without callback keys.
        let env: Vec<(String, String)> = [
            ("DINGHOOK_STREAM", "on"),
            ("DINGHOOK_APP_KEY", "dingk"),
            ("DINGHOOK_APP_SECRET", "secret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::load_with_env(None, &env).unwrap();
        let apps = config.apps().unwrap();
        assert!(apps[0].stream.enabled && !apps[0].push_enabled());
    }
}
