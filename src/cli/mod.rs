//! The `dinghook` command line: serve, sign and inspect requests, look at stored events and
//! notifications, check the configuration.
//!
//! It lives in the library so that a program that registers its own handlers keeps the whole
//! command line: its `main` is
//!
//! ```no_run
//! use dinghook::handler::{HandlerError, Registrations};
//! fn main() -> std::process::ExitCode {
//!     dinghook::cli::run(|app| {
//!         app.on_chat_update_title(|rename, _ctx| async move {
//!             println!("group renamed to {}", rename.title);
//!             Ok::<(), HandlerError>(())
//!         })
//!     })
//! }
//! ```
//!
//! and `dinghook serve` then runs the built-in handlers the configuration enables beside the
//! program's own. The shipped binary is [`main`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod act;
mod routes;

use crate::app::{shutdown_signal, AppBuilder, Application};
use crate::config::{AppSpec, Config, DEFAULT_APP};
use crate::crypto::{random_nonce, verify_signature, Sealed};
use crate::store::{EventState, ListQuery, ReplaySelector, StoredEvent};
use crate::time::now_millis;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dinghook",
    version,
    about = "A DingTalk event-subscription (HTTP Push) gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// TOML config file; environment variables (DINGHOOK_*) override it.
    #[arg(long, short, env = "DINGHOOK_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        Config::load(self.config.as_deref()).context("invalid configuration")
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ConfigArg),
    /// Sign and encrypt an event JSON (a file, or standard input) as DingTalk would, and print
    /// a ready-to-paste curl command.
    Encrypt {
        #[command(flatten)]
        config: ConfigArg,
        /// The event JSON file; `-` or nothing reads standard input.
        input: Option<PathBuf>,
        /// Print the query parameters and body as JSON instead of a curl command.
        #[arg(long)]
        json: bool,
        /// The callback URL (default: the configured listen address and callback path).
        #[arg(long)]
        url: Option<String>,
        /// Timestamp to sign with (default: now, in milliseconds).
        #[arg(long)]
        timestamp: Option<String>,
        /// Nonce to sign with (default: 16 random characters).
        #[arg(long)]
        nonce: Option<String>,
        /// The app whose keys sign it (default: `default`, or the only app).
        #[arg(long)]
        app: Option<String>,
    },
    /// Verify and decrypt a captured request (or one of our replies) and print the message.
    Decrypt {
        #[command(flatten)]
        config: ConfigArg,
        /// The request URL or just its query string (signature, timestamp, nonce). Not
        /// needed for a reply body, which carries its own.
        #[arg(long)]
        query: Option<String>,
        /// The JSON body file; `-` or nothing reads standard input.
        input: Option<PathBuf>,
        /// The app whose keys open it (default: `default`, or the only app).
        #[arg(long)]
        app: Option<String>,
    },
    /// Inspect the stored events (works with the server running or not).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Work notifications sent by the built-in handlers, and what DingTalk delivered.
    #[command(subcommand)]
    Notifications(NotificationsCommand),
    /// Print the effective configuration with secrets redacted.
    CheckConfig(ConfigArg),
    /// Make the running server read its configuration again (apps added, changed, removed)
    /// and print what changed. Like `kill -HUP <pid>`, but it waits for the answer: a
    /// configuration with an error is refused, with the key and the reason, and the running
    /// one kept.
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// The server's operator listener; default: `ops.listen` of the configuration.
        #[arg(long)]
        ops_url: Option<String>,
    },
    /// Routes: their backlogs, pausing and resuming them.
    #[command(subcommand)]
    Routes(routes::RoutesCommand),
    /// The deliveries of routes: list, show, send again.
    #[command(subcommand)]
    Deliveries(routes::DeliveriesCommand),
    /// Queue an action on DingTalk (as `POST /api/v1/apps/{app}/actions` does); the running
    /// server's workers run it. Prints its id; `dinghook events show ID` follows it.
    Act(act::ActArgs),
    /// Exit 0 if URL answers 2xx within 3 s (for container health checks; no curl needed).
    Healthcheck {
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// List events, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this state: pending, running, retry, done or dead.
        #[arg(long)]
        state: Option<String>,
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this app's events.
        #[arg(long)]
        app: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one event, payload included.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        id: i64,
    },
    /// Send events back to pending (attempts reset): by id, every dead one, or all received
    /// since a time.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Event ids.
        ids: Vec<i64>,
        /// Every event in this state (usually `dead`).
        #[arg(long, conflicts_with_all = ["ids", "since"])]
        state: Option<String>,
        /// Every event received since TIME: epoch ms, RFC 3339 (2026-11-21T08:00:00Z) or a
        /// duration ago (`2h`).
        #[arg(long, conflicts_with = "ids")]
        since: Option<String>,
    },
    /// Counts per state and type, and the age of the oldest waiting event; then each app's.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this app's events.
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NotificationsCommand {
    /// Most recent first: task id, kind, status, recipients and delivery problems.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One notification with its delivery result.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        task_id: i64,
    },
}

async fn notifications(command: NotificationsCommand) -> Result<()> {
    let (NotificationsCommand::List { config, .. } | NotificationsCommand::Show { config, .. }) =
        &command;
    let config =
        Config::load_for_store(config.config.as_deref()).context("invalid configuration")?;
    let store = crate::store::open(&config.store).await?;
    let result = match command {
        NotificationsCommand::List { limit, json, .. } => {
            for doc in store.list_documents("notification", limit).await? {
                let b = &doc.body;
                if json {
                    println!("{b}");
                } else {
                    let list = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
                    let r = &b["result"];
                    println!(
                        "{:>12}  {:<12} {:<8} to {:<3} failed {} forbidden {} read {}",
                        b["task_id"],
                        b["kind"].as_str().unwrap_or(""),
                        b["status"].as_str().unwrap_or(""),
                        list(&b["userids"]),
                        list(&r["failed"]),
                        list(&r["forbidden"]),
                        list(&r["read"]),
                    );
                }
            }
            Ok(())
        }
        NotificationsCommand::Show { task_id, .. } => {
            match store
                .get_document("notification", &task_id.to_string())
                .await?
            {
                Some(doc) => {
                    println!("{}", serde_json::to_string_pretty(&doc.body)?);
                    Ok(())
                }
                None => Err(anyhow::anyhow!("no notification with task id {task_id}")),
            }
        }
    };
    store.close().await;
    result
}

/// Epoch ms from `1795284000000`, `2026-11-21T08:00:00Z` or `2h` (ago).
fn parse_since(text: &str) -> Result<i64> {
    let usage =
        || format!("--since {text:?}: use epoch ms, an RFC 3339 time or a duration such as 2h");
    if let Ok(ms) = text.trim().parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(text.trim()) {
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| anyhow::anyhow!("--since {text:?}: the time is before 1970"))?;
        return Ok(crate::time::millis(ms));
    }
    let ago = humantime::parse_duration(text.trim()).with_context(usage)?;
    let now = now_millis();
    let ago = crate::time::millis(ago);
    if ago > now {
        bail!("--since {text:?}: that is before 1970");
    }
    Ok(now - ago)
}

/// `text` as one shell word: single-quoted, a `'` inside written `'\''`. The curl command
/// `encrypt` prints is meant to be piped to `sh`, so no argument may end its quotes early.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `text` for a terminal: control characters (a newline, an escape sequence) written as
/// `\u{..}` escapes, so a stored value cannot forge lines or move the cursor.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

fn parse_state(text: &str) -> Result<EventState> {
    EventState::parse(text).with_context(|| {
        format!("unknown state {text:?}: use pending, running, retry, done or dead")
    })
}

fn event_json(e: &StoredEvent) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "app": e.app,
        "dedup_key": crate::store::scoped::unscoped(&e.app, &e.dedup_key),
        "event_type": e.event_type,
        "state": e.state,
        "attempts": e.attempts,
        "last_error": e.last_error,
        "corp_id": e.corp_id,
        "source": e.source,
        "received_at": e.received_at,
        "next_attempt_at": e.next_attempt_at,
        "handled": e.handled,
    })
}

async fn events(command: EventsCommand) -> Result<()> {
    let (EventsCommand::List { config, .. }
    | EventsCommand::Show { config, .. }
    | EventsCommand::Replay { config, .. }
    | EventsCommand::Stats { config, .. }) = &command;
    let config =
        Config::load_for_store(config.config.as_deref()).context("invalid configuration")?;
    let store = crate::store::open(&config.store).await?;
    let result = match command {
        EventsCommand::List {
            state,
            event_type,
            app,
            limit,
            json,
            ..
        } => {
            let state = match state {
                Some(s) => Some(EventState::parse(&s).with_context(|| {
                    format!("unknown state {s:?}: use pending, running, retry, done or dead")
                })?),
                None => None,
            };
            let query = ListQuery {
                app,
                state,
                event_type,
                limit: Some(limit),
                ..ListQuery::default()
            };
            for e in store.list(&query).await? {
                if json {
                    println!("{}", event_json(&e));
                } else {
                    println!(
                        "{:>8}  {:<8} {:>3}  {:<32} {}",
                        e.id,
                        e.state.as_str(),
                        e.attempts,
                        printable(&e.event_type),
                        printable(&e.dedup_key)
                    );
                }
            }
            Ok(())
        }
        EventsCommand::Show { id, .. } => match store.get(id).await? {
            Some(e) => {
                let mut value = event_json(&e);
                value["payload"] = serde_json::from_str(&e.payload)
                    .unwrap_or(serde_json::Value::String(e.payload.clone()));
                value["runs"] = serde_json::to_value(store.runs(id, 100).await?)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
                Ok(())
            }
            None => Err(anyhow::anyhow!("no event with id {id}")),
        },
        EventsCommand::Replay {
            ids, state, since, ..
        } => {
            let selector = match (state, since) {
                (Some(state), _) => ReplaySelector::State(parse_state(&state)?),
                (None, Some(since)) => ReplaySelector::Since(parse_since(&since)?),
                (None, None) if !ids.is_empty() => ReplaySelector::Ids(ids),
                (None, None) => {
                    bail!("say what to replay: event ids, --state dead or --since TIME")
                }
            };
            let n = store.replay(&selector, now_millis()).await?;
            println!("{n} event(s) sent back to pending");
            Ok(())
        }
        EventsCommand::Stats { app, json, .. } => {
            let stats = store.stats_for(app.as_deref(), now_millis()).await?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                print_stats(&stats, app.is_none());
            }
            Ok(())
        }
    };
    store.close().await;
    result
}

/// `events stats` as text: the totals (of every app, or of the one asked for) and the types;
/// with `per_app`, then one line per app.
fn print_stats(stats: &crate::store::Stats, per_app: bool) {
    let waiting = |age: Option<i64>| match age {
        Some(ms) => format!("oldest waiting event: due {:.1} s ago", ms as f64 / 1000.0),
        None => "nothing waiting".to_owned(),
    };
    let states = |counts: &std::collections::BTreeMap<String, u64>| {
        let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
        parts.join(" ")
    };
    for (state, n) in &stats.by_state {
        println!("{state:<8} {n}");
    }
    println!("{}", waiting(stats.oldest_pending_age_ms));
    for (event_type, counts) in &stats.by_type {
        println!("{:<34} {}", printable(event_type), states(counts));
    }
    if per_app {
        for (app, figures) in &stats.by_app {
            println!(
                "app {:<16} {}; {}",
                printable(app),
                states(&figures.by_state),
                waiting(figures.oldest_pending_age_ms)
            );
        }
    }
}

fn read_input(path: Option<&Path>) -> Result<Vec<u8>> {
    match path {
        Some(p) if p != Path::new("-") => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read standard input")?;
            Ok(buf)
        }
    }
}

fn default_url(config: &Config, app: &AppSpec) -> String {
    let listen = config.listen.replacen("0.0.0.0:", "127.0.0.1:", 1);
    format!("http://{listen}{}", app.callback.path)
}

/// The app `--app` names; without it, `default`, or the only app there is.
fn pick_app(config: &Config, name: Option<&str>) -> Result<AppSpec> {
    let apps = config.apps()?;
    let names = || {
        apps.iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = match name {
        Some(name) => apps.iter().find(|a| a.name == name),
        None if apps.len() == 1 => apps.first(),
        None => apps.iter().find(|a| a.name == DEFAULT_APP),
    };
    match (found, name) {
        (Some(app), _) => Ok(app.clone()),
        (None, Some(name)) => bail!("no app named {name:?}; the apps are: {}", names()),
        (None, None) => bail!(
            "several apps are configured: choose one with --app ({})",
            names()
        ),
    }
}

fn encrypt(
    config: &Config,
    app: Option<&str>,
    input: Option<&Path>,
    json: bool,
    url: Option<String>,
    timestamp: Option<String>,
    nonce: Option<String>,
) -> Result<()> {
    let raw = read_input(input)?;
    let text = std::str::from_utf8(&raw)
        .context("the event is not UTF-8")?
        .trim();
    serde_json::from_str::<serde_json::Value>(text).context("the event is not valid JSON")?;
    let app = pick_app(config, app)?;
    let cipher = app.cipher()?;
    let timestamp = timestamp.unwrap_or_else(|| now_millis().to_string());
    let nonce = nonce.unwrap_or_else(random_nonce);
    let sealed = cipher.seal(text.as_bytes(), &timestamp, &nonce)?;
    let url = url.unwrap_or_else(|| default_url(config, &app));
    if json {
        let out = serde_json::json!({
            "url": format!("{url}?{}", sealed.query()),
            "query": {
                "signature": sealed.msg_signature,
                "msg_signature": sealed.msg_signature,
                "timestamp": sealed.timestamp,
                "nonce": sealed.nonce,
            },
            "body": { "encrypt": sealed.encrypt },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "curl -sS -X POST {} -H 'Content-Type: application/json' -d {}",
            shell_quote(&format!("{url}?{}", sealed.query())),
            shell_quote(&sealed.body())
        );
    }
    Ok(())
}

fn decrypt(
    config: &Config,
    app: Option<&str>,
    query: Option<&str>,
    input: Option<&Path>,
) -> Result<()> {
    let raw = read_input(input)?;
    let body: serde_json::Value = serde_json::from_slice(&raw).context("the body is not JSON")?;
    let encrypt = body["encrypt"]
        .as_str()
        .context("the body has no \"encrypt\" string")?;
    let app = pick_app(config, app)?;
    let cipher = app.cipher()?;
    // A reply carries its own signature fields; a request has them in the query.
    let signed = if let Ok(reply) = serde_json::from_value::<Sealed>(body.clone()) {
        (reply.msg_signature, reply.timestamp, reply.nonce)
    } else {
        let query = query.context("--query is needed: the request's URL or query string")?;
        let query = query.split_once('?').map_or(query, |(_, q)| q);
        let q = crate::sources::push::SignedQuery::parse(Some(query))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        (q.signature, q.timestamp, q.nonce)
    };
    let token_ok = verify_signature(
        app.callback.token.expose(),
        &signed.1,
        &signed.2,
        encrypt,
        &signed.0,
    );
    if let Err(e) = token_ok {
        bail!("{e} (DingTalk code {}): check the token", e.dingtalk_code());
    }
    let msg = cipher
        .decrypt(encrypt)
        .map_err(|e| anyhow::anyhow!("{e} (DingTalk code {})", e.dingtalk_code()))?;
    let text = String::from_utf8_lossy(&msg);
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
        Err(_) => println!("{text}"),
    }
    Ok(())
}

async fn healthcheck(url: &str) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        bail!("GET {url}: {}", response.status());
    }
    Ok(())
}

async fn serve(config: Config, file: Option<PathBuf>, customize: Customize) -> Result<()> {
    crate::telemetry::init(config.log_format, &config.log_level);
    // Before the build, so a SIGHUP while starting is not the default action (exit).
    #[cfg(unix)]
    let hangups = crate::app::hangups();
    let builder = Application::builder(config).config_source(move || Config::load(file.as_deref()));
    let app = customize(builder).build().await?;
    #[cfg(unix)]
    tokio::spawn(crate::app::reload_on_hangup(hangups, app.reloader()));
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}

/// `dinghook reload`: `POST /reload` on the operator listener.
async fn reload(config: &ConfigArg, ops_url: Option<String>) -> Result<()> {
    let base = match ops_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let config =
                Config::load_for_ops(config.config.as_deref()).context("invalid configuration")?;
            let Some(addr) = config.ops_addr()? else {
                bail!(
                    "ops.listen is empty, so the server has no operator listener: send it \
                     SIGHUP instead (kill -HUP <pid>)"
                );
            };
            // A wildcard bind is reached on loopback.
            let ip = match addr.ip() {
                ip if ip.is_unspecified() && ip.is_ipv4() => {
                    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                }
                ip if ip.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
    };
    let url = format!("{base}/reload");
    // A reload of a thousand apps takes about a second; leave it room.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let response = client
        .post(&url)
        .send()
        .await
        .with_context(|| format!("POST {url}: is the server running?"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .with_context(|| format!("POST {url}: {status}, not a JSON answer"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("reload refused ({status}): {message}");
    }
    println!("{}", serde_json::to_string_pretty(&body["reloaded"])?);
    Ok(())
}

/// What a program adds to the application before `serve` builds it.
type Customize = Box<dyn FnOnce(AppBuilder) -> AppBuilder + Send>;

/// A command whose reader went away (`dinghook events list | head -1`) ends as Unix tools do,
/// killed by SIGPIPE without a word, instead of panicking in `println!` on EPIPE. Not for
/// `serve`: the server's sockets must never kill it (Rust's socket writes pass MSG_NOSIGNAL;
/// this only changes what a write to a closed pipe does).
fn exit_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal; called before this process
    // writes to standard output, with no handler of ours installed for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Two glibc malloc settings, each from a measurement:
///
/// - glibc gives every thread that allocates its own arena (up to 8 per core), and memory
///   freed in one arena is not reused by the others: in the ten-minute soak the server's RSS
///   wandered between 47 and 71 MB with them, and stayed at 28 MB with two
///   (`docs/reliability.md`, "Soak"). An explicit `MALLOC_ARENA_MAX` wins.
/// - Blocks of 64 KiB and more (request bodies near the limit) are mapped on their own and
///   unmapped when freed. By default glibc raises that threshold as such blocks are freed and
///   then keeps them in the heap: after a flood of 1 MiB bodies the RSS stayed twice the
///   baseline (`docs/reliability.md`, "Hostile clients"). An explicit
///   `MALLOC_MMAP_THRESHOLD_` wins.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; it is called before any other
        // thread exists (the runtime is built after it).
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
            }
        }
    }
}

/// The shipped `dinghook` binary: the command line with the built-in handlers only.
pub fn main() -> ExitCode {
    run(|app| app)
}

/// The command line, with `customize` applied to the application `serve` builds (register
/// handlers on it). Parses the process arguments, runs the command and returns its exit code.
pub fn run(customize: impl FnOnce(AppBuilder) -> AppBuilder + Send + 'static) -> ExitCode {
    tune_malloc();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(dispatch_command(Box::new(customize))),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch_command(customize: Customize) -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        exit_quietly_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Serve(arg) => match arg.load() {
            Ok(config) => serve(config, arg.config, customize).await,
            Err(e) => Err(e),
        },
        Command::Encrypt {
            config,
            input,
            json,
            url,
            timestamp,
            nonce,
            app,
        } => config.load().and_then(|c| {
            encrypt(
                &c,
                app.as_deref(),
                input.as_deref(),
                json,
                url,
                timestamp,
                nonce,
            )
        }),
        Command::Decrypt {
            config,
            query,
            input,
            app,
        } => config
            .load()
            .and_then(|c| decrypt(&c, app.as_deref(), query.as_deref(), input.as_deref())),
        Command::Events(command) => events(command).await,
        Command::Notifications(command) => notifications(command).await,
        Command::CheckConfig(config) => config.load().map(|c| print!("{}", c.to_redacted_toml())),
        Command::Healthcheck { url } => healthcheck(&url).await,
        Command::Reload { config, ops_url } => reload(&config, ops_url).await,
        Command::Routes(command) => routes::routes(command).await,
        Command::Act(args) => act::act(args).await,
        Command::Deliveries(command) => routes::deliveries(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dinghook: {e:#}");
            ExitCode::FAILURE
        }
    }
}
