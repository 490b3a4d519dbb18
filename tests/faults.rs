//! Faults, with real processes: the `dinghook` binary serving signed callbacks over loopback
//! while its database or DingTalk misbehaves, or while it is told to stop.
//!
//! - PostgreSQL stopped in the middle of a load and started again (a private, throw-away
//!   server, never the machine's shared one);
//! - the SQLite volume full (a small tmpfs), then space coming back;
//! - the fake DingTalk hanging, answering 500, throttling: the acknowledgement p99 stays put;
//! - SIGTERM during a load: in-flight requests finish, workers stop at a safe point, and
//!   runs that outlast the grace period go back to `pending` instead of waiting out a lease.
//!
//! Each test prints what it measured (`cargo test --test faults -- --nocapture`);
//! `docs/reliability.md` keeps the numbers. The tests take turns (one lock), so the latency
//! test is not measuring its neighbours.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dinghook::crypto::Sealed;
use dinghook::store::{EventState, Store};
use serde_json::{json, Value};
use support::private_pg::PrivatePostgres;
use support::*;

/// One test at a time: they start servers, load them and time them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The DingTalk app secret the servers of these tests are given (token and aes_key are
/// support's TOKEN and AES_KEY).
const APP_SECRET: &str = "faults-app-secret-never-print-me-7c1d";
const APP_KEY: &str = "dingfaultsapp";

fn secrets() -> [&'static str; 3] {
    [TOKEN, AES_KEY, APP_SECRET]
}

// --- load ------------------------------------------------------------------------------------

/// What one callback got back.
#[derive(Debug, Clone)]
enum Answer {
    /// 200 with a reply that verifies and decrypts to `success`.
    Acked,
    /// Any other HTTP answer.
    Status(u16, String),
    /// A 200 whose body is not a valid sealed `success`.
    BadReply(String),
    /// No HTTP answer (refused, reset, timed out).
    Transport(String),
}

#[derive(Debug, Clone)]
struct Shot {
    id: String,
    sent: Instant,
    done: Instant,
    answer: Answer,
}

impl Shot {
    fn acked(&self) -> bool {
        matches!(self.answer, Answer::Acked)
    }

    fn latency(&self) -> Duration {
        self.done - self.sent
    }
}

/// Posts `msg` signed and encrypted, as DingTalk would, and classifies the answer.
async fn shoot(client: &reqwest::Client, url: &str, id: &str, msg: &str) -> Shot {
    let cipher = sender();
    let sealed = seal(&cipher, msg);
    let sent = Instant::now();
    let answer = match client
        .post(format!("{url}?{}", sealed.query()))
        .header("content-type", "application/json")
        .body(sealed.body())
        .send()
        .await
    {
        Err(e) => Answer::Transport(format!("{e:?}")),
        Ok(response) => {
            let status = response.status().as_u16();
            match response.text().await {
                Err(e) => Answer::Transport(format!("reading the body: {e:?}")),
                Ok(body) if status == 200 => match serde_json::from_str::<Sealed>(&body) {
                    Ok(reply)
                        if cipher
                            .open(
                                &reply.msg_signature,
                                &reply.timestamp,
                                &reply.nonce,
                                &reply.encrypt,
                            )
                            .is_ok_and(|m| m == b"success") =>
                    {
                        Answer::Acked
                    }
                    _ => Answer::BadReply(body),
                },
                Ok(body) => Answer::Status(status, body),
            }
        }
    };
    Shot {
        id: id.to_owned(),
        sent,
        done: Instant::now(),
        answer,
    }
}

/// Senders posting distinct events until stopped, keeping every answer.
struct Load {
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `concurrency` senders posting `make(id)` to `url`; ids are `prefix-N`.
    fn start(url: String, concurrency: usize, prefix: &str, make: fn(&str) -> String) -> Load {
        let shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("client");
        let tasks = (0..concurrency)
            .map(|_| {
                let (shots, stop, next, client, url) = (
                    Arc::clone(&shots),
                    Arc::clone(&stop),
                    Arc::clone(&next),
                    client.clone(),
                    url.clone(),
                );
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{prefix}-{}", next.fetch_add(1, Ordering::Relaxed));
                        let shot = shoot(&client, &url, &id, &make(&id)).await;
                        let acked = shot.acked();
                        shots.lock().unwrap().push(shot);
                        if !acked {
                            // Failures are fast; do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Load { shots, stop, tasks }
    }

    fn acked(&self) -> usize {
        self.shots
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.acked())
            .count()
    }

    fn snapshot(&self) -> Vec<Shot> {
        self.shots.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`) until `done(shots)` holds.
    async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[Shot]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.shots.lock().unwrap()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("sender");
        }
        let shots = self.shots.lock().unwrap().clone();
        shots
    }
}

fn acked_ids(shots: &[Shot]) -> Vec<String> {
    shots
        .iter()
        .filter(|s| s.acked())
        .map(|s| s.id.clone())
        .collect()
}

/// A 503 from the callback: the JSON error a store failure gives, nothing else.
fn is_store_503(answer: &Answer) -> bool {
    let Answer::Status(503, body) = answer else {
        return false;
    };
    serde_json::from_str::<Value>(body).is_ok_and(|v| {
        matches!(
            v["error"]["code"].as_str(),
            Some("store_unavailable" | "timeout")
        ) && v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    })
}

/// Every error body received, for the secrets check.
fn error_bodies(shots: &[Shot]) -> String {
    shots
        .iter()
        .filter_map(|s| match &s.answer {
            Answer::Status(_, body) | Answer::BadReply(body) => Some(body.as_str()),
            Answer::Transport(e) => Some(e.as_str()),
            Answer::Acked => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    assert!(!latencies.is_empty());
    latencies.sort_unstable();
    let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
    latencies[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// --- events ----------------------------------------------------------------------------------

/// A group rename: the built-in handler records the title in the `groups` collection without
/// calling DingTalk, so "handled" is visible in the store. Padded to about 1 KB.
fn rename(id: &str) -> String {
    json!({
        "EventType": "chat_update_title", "eventId": id, "CorpId": "dingfaults",
        "timeStamp": 1_700_000_000_000_i64, "chatId": format!("chat-{id}"),
        "openConversationId": format!("cid-{id}"), "title": format!("t-{id}"),
        "operator": "faults", "note": "x".repeat(800)
    })
    .to_string()
}

const GROUPS: usize = 8;

/// A cool-app install in one of `GROUPS` groups: the built-in handler looks the group up and
/// greets it, two DingTalk calls.
fn install(id: &str) -> String {
    let n: usize = id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    json!({
        "EventType": "im_cool_app_install", "eventId": id, "CorpId": "dingfaults",
        "coolAppCode": "COOLAPP-F", "robotCode": "robot-f",
        "openConversationId": format!("cid-g{}", n % GROUPS), "openConversationCorpId": "dingfaults",
        "operator": "op", "operateTime": "1641866135051"
    })
    .to_string()
}

/// Waits until every event in `ids` is `done` and, for renames, its group carries its title.
/// Returns how long that took.
async fn wait_all_handled(
    store: &dyn Store,
    ids: &[String],
    renames: bool,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    let mut left: Vec<&String> = ids.iter().collect();
    loop {
        let mut still = Vec::new();
        for id in left {
            let event = store
                .find_by_dedup_key(&format!("event:{id}"))
                .await
                .expect("store");
            let Some(event) = event else {
                panic!("acknowledged event {id} is not in the store");
            };
            let handled = event.state == EventState::Done
                && (!renames
                    || store
                        .get_document("group", &format!("cid-{id}"))
                        .await
                        .expect("store")
                        .is_some_and(|d| d.body["title"] == format!("t-{id}")));
            if !handled {
                still.push(id);
            }
        }
        if still.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            let first = store
                .find_by_dedup_key(&format!("event:{}", still[0]))
                .await
                .expect("store");
            panic!(
                "{} acknowledged events not handled after {timeout:?}; first: {first:?}",
                still.len()
            );
        }
        left = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- processes -------------------------------------------------------------------------------

fn read_log(server: &ServerProcess) -> String {
    std::fs::read_to_string(&server.log).unwrap_or_default()
}

async fn get_status(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(12))
        .build()
        .ok()?;
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Sends SIGTERM and returns (exit status, time to exit).
async fn sigterm(server: &mut ServerProcess) -> (std::process::ExitStatus, Duration) {
    let pid = server.child.id().expect("running");
    let started = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("exit after SIGTERM")
        .expect("exit status");
    (status, started.elapsed())
}

/// The `fake-dingtalk` binary as its own process, scripted over its `/_fake` routes.
struct FakeProcess {
    /// Killed when dropped.
    _child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
}

impl FakeProcess {
    async fn start() -> FakeProcess {
        let port = free_port();
        let child = tokio::process::Command::new(fake_dingtalk_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_clear()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the fake DingTalk");
        let fake = FakeProcess {
            _child: child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        for _ in 0..200 {
            if get_status(&format!("{}/_fake/state", fake.base)).await == Some(200) {
                return fake;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the fake DingTalk did not start");
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .client
            .request(method, format!("{}/_fake{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("fake admin");
        assert!(response.status().is_success(), "/_fake{path}");
        response.json().await.unwrap_or(Value::Null)
    }

    async fn post(&self, path: &str, body: Value) {
        self.admin(reqwest::Method::POST, path, body).await;
    }

    /// Healthy again: no faults, no delay.
    async fn heal(&self) {
        self.admin(reqwest::Method::DELETE, "/faults", Value::Null)
            .await;
        self.post("/delay", json!({ "ms": 0 })).await;
    }

    /// How many calls it has received.
    async fn calls(&self) -> usize {
        self.admin(reqwest::Method::GET, "/calls", Value::Null)
            .await
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Requires our credentials and knows the groups `install` uses.
    async fn prepare(&self) {
        self.post(
            "/credentials",
            json!({ "app_key": APP_KEY, "app_secret": APP_SECRET }),
        )
        .await;
        let groups: Vec<Value> = (0..GROUPS)
            .map(|g| json!({ "openConversationId": format!("cid-g{g}"), "title": format!("G{g}"), "coolAppCode": "COOLAPP-F" }))
            .collect();
        self.post("/groups", Value::Array(groups)).await;
    }

    /// The environment that points a server at this fake, with quick client retries (a
    /// config file in `dir`), so handlers keep calling it while it misbehaves.
    fn env(&self, dir: &Path) -> Vec<(&'static str, String)> {
        let config = dir.join("dingtalk.toml");
        std::fs::write(
            &config,
            "[dingtalk]\nretry_base_delay = \"20ms\"\nretry_max_delay = \"100ms\"\n",
        )
        .expect("config file");
        vec![
            ("DINGHOOK_CONFIG", config.display().to_string()),
            ("DINGHOOK_APP_KEY", APP_KEY.to_owned()),
            ("DINGHOOK_APP_SECRET", APP_SECRET.to_owned()),
            ("DINGHOOK_AGENT_ID", "4242".to_owned()),
            ("DINGHOOK_DINGTALK_OAPI_URL", self.base.clone()),
            ("DINGHOOK_DINGTALK_API_URL", self.base.clone()),
            ("DINGHOOK_DINGTALK_QPS", "1000".to_owned()),
        ]
    }
}

/// Quick polling and retries, so the tests wait milliseconds rather than the production
/// schedule. The lease stays at its default (5 minutes): nothing here may depend on one
/// running out.
const FAST: [(&str, &str); 2] = [
    ("DINGHOOK_POLL_INTERVAL", "50ms"),
    (
        "DINGHOOK_RETRY_SCHEDULE",
        "200ms,200ms,200ms,200ms,200ms,200ms",
    ),
];

async fn start_server(log_dir: &Path, store_url: &str, extra: &[(&str, String)]) -> ServerProcess {
    let mut env: Vec<(&str, &str)> = vec![("DINGHOOK_STORE_URL", store_url)];
    env.extend(FAST.iter().copied());
    env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    ServerProcess::start_program(
        env!("CARGO_BIN_EXE_dinghook"),
        &["serve"],
        log_dir,
        free_port(),
        &env,
    )
    .await
}

fn sqlite_states(db: &Path) -> BTreeMap<String, i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database");
    let mut stmt = conn
        .prepare("SELECT state, COUNT(*) FROM events GROUP BY state")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

fn integrity_check(db: &Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

// --- PostgreSQL stopped and started ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_load_answers_503_and_every_acked_event_is_handled_after() {
    let _turn = SERIAL.lock().await;
    let mut pg = match PrivatePostgres::start() {
        Ok(pg) => pg,
        Err(reason) => {
            eprintln!("SKIPPED postgres_stopped_mid_load: {reason}");
            return;
        }
    };
    let logs = tempfile::tempdir().unwrap();
    let mut server = start_server(logs.path(), &pg.url(), &[]).await;
    let callback = server.url("/dingtalk/callback");
    let readyz = server.url("/readyz");
    assert_eq!(get_status(&readyz).await, Some(200));

    let load = Load::start(callback, 8, "pg", rename);
    load.wait_for("200 acknowledgements", Duration::from_secs(20), |s| {
        s.iter().filter(|s| s.acked()).count() >= 200
    })
    .await;

    // Down: every callback from now until the server is started again must be a 503.
    pg.stop().expect("stop PostgreSQL");
    let down = Instant::now();
    load.wait_for("503s while down", Duration::from_secs(10), |s| {
        s.iter()
            .filter(|s| s.sent > down && is_store_503(&s.answer))
            .count()
            >= 20
    })
    .await;
    let ready_started = Instant::now();
    let ready_down = get_status(&readyz).await;
    let ready_took = ready_started.elapsed();
    // Keep it down a while longer, under load.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let up_begins = Instant::now();
    pg.start_again().expect("start PostgreSQL again");
    let up = Instant::now();

    let acked_before_up = load.acked();
    load.wait_for(
        "acknowledgements after the restart",
        Duration::from_secs(20),
        |s| s.iter().filter(|s| s.acked()).count() >= acked_before_up + 200,
    )
    .await;
    let mut ready_up = None;
    for _ in 0..100 {
        ready_up = get_status(&readyz).await;
        if ready_up == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shots = load.finish().await;

    // While down (sent after the stop returned, answered before the start began): 503 only.
    let while_down: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.sent > down && s.done < up_begins)
        .collect();
    let wrong: Vec<&&Shot> = while_down
        .iter()
        .filter(|s| !is_store_503(&s.answer))
        .collect();
    assert!(
        wrong.is_empty(),
        "answers while PostgreSQL was down: {wrong:?}"
    );
    assert!(while_down.len() >= 20, "{}", while_down.len());
    // Anything else is a verified 200 or a 503: no other status, no dropped connection.
    let odd: Vec<&Shot> = shots
        .iter()
        .filter(|s| !s.acked() && !is_store_503(&s.answer))
        .collect();
    assert!(odd.is_empty(), "{odd:?}");
    assert!(
        ready_down.is_some_and(|s| s != 200),
        "/readyz while down: {ready_down:?}"
    );
    assert!(
        ready_took < Duration::from_secs(8),
        "/readyz took {ready_took:?}"
    );
    assert_eq!(ready_up, Some(200), "/readyz after the restart");

    let first_503 = shots
        .iter()
        .filter(|s| s.sent > down && is_store_503(&s.answer))
        .map(|s| s.done - down)
        .min()
        .unwrap();
    let recovered = shots
        .iter()
        .filter(|s| s.sent > up && s.acked())
        .map(|s| s.done - up)
        .min()
        .unwrap();
    let max_503 = while_down.iter().map(|s| s.latency()).max().unwrap();
    // Until the start returned (the server accepts connections before that).
    let until_up = shots.iter().filter(|s| s.sent > down && s.done < up);
    let (until_up_503, until_up_200) = until_up.fold((0, 0), |(n503, n200), s| {
        (
            n503 + usize::from(is_store_503(&s.answer)),
            n200 + usize::from(s.acked()),
        )
    });

    // Every acknowledged event is there and handled.
    let acked = acked_ids(&shots);
    let store = stores::open_url(&pg.url()).await;
    let handled_in = wait_all_handled(&*store, &acked, true, Duration::from_secs(20)).await;
    store.close().await;

    let (status, _) = sigterm(&mut server).await;
    assert!(status.success(), "{status}");
    let log = read_log(&server);
    assert_no_secrets(&log, &secrets());
    assert_no_secrets(&error_bodies(&shots), &secrets());

    println!(
        "FAULTS postgres: {} requests, {} acked; down {:.1} s: {} callbacks answered while down, \
         all 503 (slowest {:.0} ms); until the start returned ({:.1} s) {} x 503, {} x 200; \
         first 503 {:.0} ms after the stop; /readyz while down {:?} in {:.0} ms; first 200 \
         {:.0} ms after the start returned; all acked handled {:.0} ms after the load ended",
        shots.len(),
        acked.len(),
        (up_begins - down).as_secs_f64(),
        while_down.len(),
        ms(max_503),
        (up - down).as_secs_f64(),
        until_up_503,
        until_up_200,
        ms(first_503),
        ready_down,
        ms(ready_took),
        ms(recovered),
        ms(handled_in),
    );
}

// --- SQLite volume full ------------------------------------------------------------------------

/// A tmpfs mounted for the test, unmounted when dropped (also on failure).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server still holding files (a failed test) must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes `path` until the volume has no space left; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0x5a_u8; 16 * 1024];
    let mut written = 0_u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filler: {e}"),
        }
    }
    // Small writes still fit into the last partial pages.
    let small = [0x5a_u8; 512];
    while let Ok(n) = file.write(&small) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_volume_full_answers_503_stays_intact_and_recovers() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    let _mount = match Tmpfs::mount(&volume, "16m") {
        Ok(m) => m,
        Err(reason) => {
            eprintln!("SKIPPED sqlite_volume_full: {reason}");
            return;
        }
    };
    let db = volume.join("dinghook.db");
    let url = format!("sqlite://{}", db.display());
    // The log goes next to the volume, not onto it.
    let mut server = start_server(dir.path(), &url, &[]).await;
    let callback = server.url("/dingtalk/callback");

    let load = Load::start(callback.clone(), 8, "full", rename);
    load.wait_for("100 acknowledgements", Duration::from_secs(20), |s| {
        s.iter().filter(|s| s.acked()).count() >= 100
    })
    .await;

    // Full.
    let filler = volume.join("filler");
    let filled = fill(&filler);
    let full = Instant::now();
    load.wait_for("503s on the full volume", Duration::from_secs(20), |s| {
        s.iter()
            .filter(|s| s.sent > full && is_store_503(&s.answer))
            .count()
            >= 50
    })
    .await;
    let first_503 = load
        .snapshot()
        .iter()
        .filter(|s| s.sent > full && is_store_503(&s.answer))
        .map(|s| s.done - full)
        .min()
        .unwrap();
    // Stay full for a while under load: the server keeps answering.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ready_full = get_status(&server.url("/readyz")).await;
    let health_full = get_status(&server.url("/healthz")).await;
    let integrity_full = integrity_check(&db);

    // Space comes back.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = Instant::now();
    let acked_at_free = load.acked();
    load.wait_for(
        "acknowledgements after freeing space",
        Duration::from_secs(20),
        |s| s.iter().filter(|s| s.acked()).count() >= acked_at_free + 100,
    )
    .await;
    let shots = load.finish().await;
    let ready_after = get_status(&server.url("/readyz")).await;

    let while_full: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.sent > full && s.done < freed)
        .collect();
    let full_503 = while_full
        .iter()
        .filter(|s| is_store_503(&s.answer))
        .count();
    let full_200 = while_full.iter().filter(|s| s.acked()).count();
    let odd: Vec<&Shot> = shots
        .iter()
        .filter(|s| !s.acked() && !is_store_503(&s.answer))
        .collect();
    assert!(odd.is_empty(), "neither 200 nor a store 503: {odd:?}");
    assert!(full_503 >= 50, "{full_503}");
    assert_eq!(ready_full, Some(503), "/readyz on a full volume");
    assert_eq!(health_full, Some(200), "the server stays up");
    assert_eq!(integrity_full, "ok");
    assert_eq!(ready_after, Some(200), "/readyz once space is back");
    let recovered = shots
        .iter()
        .filter(|s| s.sent > freed && s.acked())
        .map(|s| s.done - freed)
        .min()
        .unwrap();

    // Every acknowledged event (the few acknowledged while full included) is stored and
    // handled; nothing that got a 503 was half-written.
    let acked = acked_ids(&shots);
    let store = stores::open_url(&url).await;
    let handled_in = wait_all_handled(&*store, &acked, true, Duration::from_secs(20)).await;
    let stored = store.count().await.unwrap() as usize;
    store.close().await;
    assert!(stored >= acked.len() && stored <= shots.len(), "{stored}");

    let (status, _) = sigterm(&mut server).await;
    assert!(status.success(), "{status}");
    assert_eq!(integrity_check(&db), "ok", "after a clean stop");
    assert_no_secrets(&read_log(&server), &secrets());
    assert_no_secrets(&error_bodies(&shots), &secrets());

    println!(
        "FAULTS sqlite-full: {} requests, {} acked; filler {} KiB; while full ({:.1} s): {} \
         answered, {} x 503, {} x 200 (stored); first 503 {:.0} ms after filling; /readyz \
         {:?}; integrity_check {integrity_full}; first 200 {:.0} ms after freeing; all acked \
         handled {:.0} ms after the load ended",
        shots.len(),
        acked.len(),
        filled / 1024,
        (freed - full).as_secs_f64(),
        while_full.len(),
        full_503,
        full_200,
        ms(first_503),
        ready_full,
        ms(recovered),
        ms(handled_in),
    );
}

/// A write that fails for space in the middle of a group commit can make SQLite roll the
/// whole transaction back. The callers of that batch must all hear that their write failed,
/// and no later write may slip into a transaction of its own behind it: what the store
/// answers `Ok` is stored, what it answers `Err` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_failing_for_space_mid_batch_leaves_only_honest_answers() {
    use dinghook::store::sqlite::SqliteStore;
    use dinghook::store::{NewEvent, Source};

    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    let _mount = match Tmpfs::mount(&volume, "8m") {
        Ok(m) => m,
        Err(reason) => {
            eprintln!("SKIPPED sqlite_write_failing_for_space_mid_batch: {reason}");
            return;
        }
    };
    let store = SqliteStore::open(&volume.join("dinghook.db"), 64)
        .await
        .unwrap();
    let event = |key: String, size: usize| NewEvent {
        app: "default".into(),
        dedup_key: key,
        event_type: "t".into(),
        corp_id: None,
        payload: "x".repeat(size),
        source: Source::Push,
        received_at: 1,
        routes: Vec::new(),
    };
    for i in 0..20 {
        store
            .insert(event(format!("before-{i}"), 1000))
            .await
            .unwrap();
    }
    // Leave about 200 KB: small events fit, a 6 MB one does not, and it outgrows the page
    // cache, so it fails while its statement runs rather than at the commit.
    let filler = volume.join("filler");
    fill(&filler);
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len - 200 * 1024)
        .unwrap();

    let mut answers = Vec::new();
    for round in 0..6 {
        let keys = [0, 1, 2, 3].map(|i| format!("r{round}-{i}"));
        let (a, big, c, d) = tokio::join!(
            store.insert(event(keys[0].clone(), 100)),
            store.insert(event(keys[1].clone(), 6_000_000)),
            store.insert(event(keys[2].clone(), 100)),
            store.insert(event(keys[3].clone(), 100)),
        );
        assert!(big.is_err(), "6 MB stored on a volume with 200 KB left");
        for (key, answer) in [(&keys[0], a), (&keys[2], c), (&keys[3], d)] {
            answers.push((key.clone(), answer.is_ok()));
        }
    }
    for (key, acked) in &answers {
        let stored = store.find_by_dedup_key(key).await.unwrap().is_some();
        assert_eq!(
            *acked,
            stored,
            "{key}: answered {} but {}",
            if *acked { "Ok" } else { "Err" },
            if stored { "stored" } else { "not stored" }
        );
    }
    // The writer lives on: with space back, writes succeed.
    std::fs::remove_file(&filler).unwrap();
    store.insert(event("after".into(), 100)).await.unwrap();
    store.close().await;
    let ok = answers.iter().filter(|(_, a)| *a).count();
    println!(
        "FAULTS sqlite-batch: {} small writes beside a failing 6 MB one: {ok} Ok (stored), {} Err \
         (not stored)",
        answers.len(),
        answers.len() - ok
    );
}

// --- DingTalk misbehaving: the acknowledgement latency does not move ----------------------------

/// `count` install events at `concurrency`, each sender waiting for its answer before the
/// next; every one must be acknowledged. Returns the shots.
async fn measure(url: &str, prefix: &str, count: usize, concurrency: usize) -> Vec<Shot> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, url, prefix) = (
                client.clone(),
                Arc::clone(&next),
                url.to_owned(),
                prefix.to_owned(),
            );
            tokio::spawn(async move {
                let mut shots = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return shots;
                    }
                    let id = format!("{prefix}-{n}");
                    shots.push(shoot(&client, &url, &id, &install(&id)).await);
                }
            })
        })
        .collect();
    let mut shots = Vec::new();
    for task in tasks {
        shots.extend(task.await.unwrap());
    }
    let failed: Vec<&Shot> = shots.iter().filter(|s| !s.acked()).collect();
    assert!(failed.is_empty(), "{prefix}: {failed:?}");
    shots
}

fn p99(shots: &[Shot]) -> Duration {
    let mut latencies: Vec<Duration> = shots.iter().map(Shot::latency).collect();
    percentile(&mut latencies, 0.99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_hanging_failing_or_throttling_does_not_move_the_ack_p99() {
    let _turn = SERIAL.lock().await;
    let fake = FakeProcess::start().await;
    fake.prepare().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let url = format!("sqlite://{}", db.display());
    let mut server = start_server(dir.path(), &url, &fake.env(dir.path())).await;
    let callback = server.url("/dingtalk/callback");

    const N: usize = 400;
    const HANG_MS: u64 = 5000;
    const C: usize = 4;
    let mut all: Vec<Shot> = measure(&callback, "warmup", 100, C).await;
    let mut phases: Vec<(&str, Duration, usize)> = Vec::new();
    let phase = async |name: &'static str, all: &mut Vec<Shot>| {
        let calls_before = fake.calls().await;
        let shots = measure(&callback, name, N, C).await;
        // The fault was met: handlers called DingTalk while it was in force.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut calls = fake.calls().await - calls_before;
        while calls == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            calls = fake.calls().await - calls_before;
        }
        let p = p99(&shots);
        all.extend(shots);
        (name, p, calls)
    };

    phases.push(phase("baseline", &mut all).await);
    // 500 with an empty body, for every call.
    fake.post("/faults", json!({ "status": 500, "times": 1_000_000 }))
        .await;
    phases.push(phase("http500", &mut all).await);
    fake.heal().await;
    // Throttled: the new API's QPS code on every call (the handler's calls are /v1.0).
    fake.post(
        "/faults",
        json!({ "status": 403, "code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                "message": "throttled", "times": 1_000_000 }),
    )
    .await;
    phases.push(phase("throttled", &mut all).await);
    fake.heal().await;
    // Hanging: every call answers after 5 s (the client's time-out is 10 s). Last, because
    // the calls it holds keep the workers busy for those 5 s.
    fake.post("/delay", json!({ "ms": HANG_MS })).await;
    phases.push(phase("hang", &mut all).await);
    fake.heal().await;
    tokio::time::sleep(Duration::from_millis(HANG_MS)).await;
    phases.push(phase("baseline-again", &mut all).await);

    let baseline = phases[0].1.max(phases[4].1);
    let bound = (baseline * 3).max(baseline + Duration::from_millis(100));
    let summary: Vec<String> = phases
        .iter()
        .map(|(name, p, calls)| format!("{name} p99 {:.1} ms ({calls} DingTalk calls)", ms(*p)))
        .collect();
    println!(
        "FAULTS dingtalk: {N} acks per phase at concurrency {C}; {}; bound {:.1} ms",
        summary.join(", "),
        ms(bound)
    );
    for (name, p, calls) in &phases {
        assert!(*calls > 0, "{name}: the handlers did not call DingTalk");
        assert!(
            *p <= bound,
            "{name}: ack p99 {p:?} above {bound:?} (baseline {baseline:?})"
        );
    }

    // The acknowledgements were honest: every acknowledged event is stored.
    let store = stores::open_url(&url).await;
    for shot in &all {
        assert!(
            store
                .find_by_dedup_key(&format!("event:{}", shot.id))
                .await
                .unwrap()
                .is_some(),
            "{} acknowledged but not stored",
            shot.id
        );
    }
    store.close().await;
    let (status, _) = sigterm(&mut server).await;
    assert!(status.success(), "{status}");
    assert_no_secrets(&read_log(&server), &secrets());
    drop(fake);
}

// --- SIGTERM during a load ---------------------------------------------------------------------

/// Starts a callback whose body arrives in two halves; the second half is sent when `rest`
/// fires. Returns the pending answer.
fn slow_callback(
    url: &str,
    id: &str,
    msg: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Shot>,
) {
    let sealed = seal(&sender(), msg);
    let body = sealed.body();
    let (first, second) = body.split_at(body.len() / 2);
    let (first, second) = (first.to_owned(), second.to_owned());
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel::<()>();
    let chunks = futures_util::stream::unfold(
        (Some(first), Some((rest_rx, second))),
        |(first, rest)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, std::io::Error>(first), (None, rest)));
            }
            let (rest_rx, second) = rest?;
            let _ = rest_rx.await;
            Some((Ok(second), (None, None)))
        },
    );
    let url = format!("{url}?{}", sealed.query());
    let id = id.to_owned();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let sent = Instant::now();
        let answer = match client
            .post(url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
        {
            Err(e) => Answer::Transport(format!("{e:?}")),
            Ok(r) if r.status() == 200 => match r.json::<Sealed>().await {
                Ok(reply)
                    if sender()
                        .open(
                            &reply.msg_signature,
                            &reply.timestamp,
                            &reply.nonce,
                            &reply.encrypt,
                        )
                        .is_ok_and(|m| m == b"success") =>
                {
                    Answer::Acked
                }
                other => Answer::BadReply(format!("{other:?}")),
            },
            Ok(r) => Answer::Status(r.status().as_u16(), r.text().await.unwrap_or_default()),
        };
        Shot {
            id,
            sent,
            done: Instant::now(),
            answer,
        }
    });
    (rest_tx, task)
}

/// Loads a server whose handlers call a slow DingTalk, sends SIGTERM while runs are in flight
/// (and one request is half-sent), and checks what the stop left behind. `delay_ms` is how
/// long each DingTalk call takes; `grace` the shutdown time-out.
async fn sigterm_under_load(name: &str, delay_ms: u64, grace: &str) -> SigtermReport {
    let fake = FakeProcess::start().await;
    fake.prepare().await;
    fake.post("/delay", json!({ "ms": delay_ms })).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let url = format!("sqlite://{}", db.display());
    let mut env = fake.env(dir.path());
    env.push(("DINGHOOK_SHUTDOWN_TIMEOUT", grace.to_owned()));
    let mut server = start_server(dir.path(), &url, &env).await;
    let callback = server.url("/dingtalk/callback");

    let load = Load::start(callback.clone(), 8, name, install);
    load.wait_for("150 acknowledgements", Duration::from_secs(20), |s| {
        s.iter().filter(|s| s.acked()).count() >= 150
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlite_states(&db).get("running").copied().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no event running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let half_id = format!("{name}-half");
    let (rest, half) = slow_callback(&callback, &half_id, &install(&half_id));
    // Let the half-sent request reach the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running_at_term = sqlite_states(&db).get("running").copied().unwrap_or(0);

    let pid = server.child.id().expect("running");
    let term = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // The rest of the half-sent request arrives after the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = rest.send(());
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("exit after SIGTERM")
        .expect("exit status");
    let exit_after = term.elapsed();
    let half = half.await.unwrap();
    // Senders keep going a moment after the exit: refused connections, nothing else.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut shots = load.finish().await;
    shots.push(half.clone());
    let states_at_exit = sqlite_states(&db);
    let log = read_log(&server);

    assert!(status.success(), "exit status {status}");
    assert!(
        matches!(half.answer, Answer::Acked),
        "the request in flight at the signal: {half:?}"
    );
    // Before the signal: all acknowledged. After it: acknowledged, or no connection at all.
    let odd: Vec<&Shot> = shots
        .iter()
        .filter(|s| match &s.answer {
            Answer::Acked => false,
            Answer::Transport(_) => s.done < term,
            _ => true,
        })
        .collect();
    assert!(odd.is_empty(), "{odd:?}");
    let refused = shots
        .iter()
        .filter(|s| matches!(s.answer, Answer::Transport(_)))
        .count();
    let acked = acked_ids(&shots);
    let acked_after_term = shots.iter().filter(|s| s.acked() && s.sent > term).count();
    // Nothing is left leased: done, or back to waiting.
    assert_eq!(
        states_at_exit.get("running").copied().unwrap_or(0),
        0,
        "events left running at exit: {states_at_exit:?}"
    );

    // Restarted against a healthy DingTalk, every acknowledged event is handled, long before
    // a 5-minute lease could have run out.
    fake.heal().await;
    let mut again = start_server(dir.path(), &url, &fake.env(dir.path())).await;
    let store = stores::open_url(&url).await;
    let handled_in = wait_all_handled(&*store, &acked, false, Duration::from_secs(20)).await;
    store.close().await;
    let (status_again, _) = sigterm(&mut again).await;
    assert!(status_again.success());
    assert_no_secrets(&log, &secrets());
    assert_no_secrets(&read_log(&again), &secrets());
    assert_no_secrets(&error_bodies(&shots), &secrets());

    SigtermReport {
        requests: shots.len(),
        acked: acked.len(),
        acked_after_term,
        refused,
        running_at_term,
        exit_after,
        states_at_exit,
        handled_in,
        log,
    }
}

struct SigtermReport {
    requests: usize,
    acked: usize,
    acked_after_term: usize,
    refused: usize,
    running_at_term: i64,
    exit_after: Duration,
    states_at_exit: BTreeMap<String, i64>,
    handled_in: Duration,
    log: String,
}

impl std::fmt::Display for SigtermReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {} acked ({} sent after the signal), {} refused after it; {} events \
             running at the signal; exit 0 after {:.0} ms; at exit {:?}; after a restart all \
             acked handled in {:.0} ms",
            self.requests,
            self.acked,
            self.acked_after_term,
            self.refused,
            self.running_at_term,
            ms(self.exit_after),
            self.states_at_exit,
            ms(self.handled_in)
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_finishes_in_flight_work_and_loses_nothing() {
    let _turn = SERIAL.lock().await;
    // Each run takes two 300 ms calls: well inside the 10 s grace.
    let report = sigterm_under_load("term", 300, "10s").await;
    println!("FAULTS sigterm: {report}");
    assert!(report.running_at_term > 0);
    assert!(
        report.exit_after < Duration::from_secs(10),
        "{:?}",
        report.exit_after
    );
    // The runs in flight finished: nothing had to be put back.
    assert!(
        !report.log.contains("shutdown timed out") && !report.log.contains("did not stop in time"),
        "{}",
        report.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_runs_longer_than_the_grace_puts_them_back_to_pending() {
    let _turn = SERIAL.lock().await;
    // Each DingTalk call takes 4 s, the grace is 1 s: the runs in flight are abandoned.
    let report = sigterm_under_load("abandon", 4000, "1s").await;
    println!("FAULTS sigterm-abandon: {report}");
    assert!(report.running_at_term > 0);
    assert!(
        report.exit_after < Duration::from_secs(4),
        "exit took {:?} with a 1 s grace",
        report.exit_after
    );
    assert!(
        report.states_at_exit.get("pending").copied().unwrap_or(0) > 0,
        "{:?}",
        report.states_at_exit
    );
    assert!(
        report.log.contains("abandoned runs put back to pending"),
        "{}",
        report.log
    );
}
