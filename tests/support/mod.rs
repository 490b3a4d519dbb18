//! Test helpers: start the real server on a random port with a fresh SQLite file, and send it
//! what DingTalk sends.
#![allow(dead_code)]

pub mod counting;
pub mod private_pg;
pub mod stores;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dinghook::app::Application;
use dinghook::config::Config;
use dinghook::crypto::{random_nonce, CallbackCipher, Sealed};
use dinghook::handler::RegistryBuilder;
use dinghook::secret::Secret;
use dinghook::store::{EventState, Store, StoredEvent};
use dinghook::time::now_millis;

pub const TOKEN: &str = "test-token-9f8e7d";
pub const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub const OWNER_KEY: &str = "dingtestappkey";

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    config.ops.listen = "127.0.0.1:0".into();
    config.callback.token = Secret::new(TOKEN);
    config.callback.aes_key = Secret::new(AES_KEY);
    config.callback.owner_key = OWNER_KEY.into();
    config.store.url = format!("sqlite://{}", dir.join("dinghook.db").display());
    // Tests register the handlers they look at; spawn_builtin turns the built-in ones on.
    config.handlers.enabled = false;
    config
}

/// Points the app's DingTalk client at a fake DingTalk on `base_url` (the fake accepts any
/// credentials unless told otherwise), with quick retries so failures show up fast.
pub fn use_fake_dingtalk(config: &mut Config, base_url: &str) {
    config.dingtalk.app_key = "dingrecoverytest".into();
    config.dingtalk.app_secret = dinghook::dingtalk::Secret::new("fake-secret");
    config.dingtalk.oapi_url = base_url.into();
    config.dingtalk.api_url = base_url.into();
    config.dingtalk.qps = 10_000;
    config.dingtalk.retry_base_delay = Duration::from_millis(10);
    config.dingtalk.retry_max_delay = Duration::from_millis(40);
}

pub fn sender() -> CallbackCipher {
    CallbackCipher::from_strings(TOKEN, AES_KEY, &[], OWNER_KEY).expect("test keys")
}

/// A signed, encrypted request for `msg`, as DingTalk would send it now.
pub fn seal(cipher: &CallbackCipher, msg: &str) -> Sealed {
    cipher
        .seal(msg.as_bytes(), &now_millis().to_string(), &random_nonce())
        .expect("seal")
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The operator listener (`/metrics`).
    pub ops_addr: Option<SocketAddr>,
    /// The HTTP API's listener, when `api.listen` is set.
    pub api_addr: Option<SocketAddr>,
    pub store: Arc<dyn Store>,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    pub callback_path: String,
    pub dispatcher: Option<Arc<dinghook::dispatch::Dispatcher>>,
    /// Applies another configuration to the running server.
    pub reloader: dinghook::app::Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    // Kept last so the directory outlives the server.
    _dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(customize: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_with_handlers(customize, RegistryBuilder::new()).await
    }

    /// A server running the built-in handlers against `fake` (a fake DingTalk's base URL),
    /// configured by `customize`.
    pub async fn spawn_builtin(fake: &str, customize: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_builtin_on(fake, customize, |store| store).await
    }

    /// [`TestApp::spawn_builtin`] with the store passed through `wrap`.
    pub async fn spawn_builtin_on(
        fake: &str,
        customize: impl FnOnce(&mut Config),
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestApp {
        let fake = fake.to_owned();
        Self::spawn_on(
            move |config| {
                config.dingtalk.app_key = "dingtestapp".into();
                config.dingtalk.app_secret = Secret::new("test-app-secret");
                config.dingtalk.agent_id = Some(4242);
                config.dingtalk.oapi_url = fake.clone();
                config.dingtalk.api_url = fake;
                // Fast client retries, so fault tests take milliseconds.
                config.dingtalk.retry_base_delay = Duration::from_millis(5);
                config.dingtalk.retry_max_delay = Duration::from_millis(20);
                config.handlers.send_result_delay = Duration::from_millis(100);
                config.handlers.enabled = true;
                customize(config);
                RegistryBuilder::new()
            },
            wrap,
        )
        .await
    }

    /// A server whose dispatcher runs `handlers`.
    pub async fn spawn_with_handlers(
        customize: impl FnOnce(&mut Config),
        handlers: RegistryBuilder,
    ) -> TestApp {
        Self::spawn_with_handlers_from(move |config| {
            customize(config);
            handlers
        })
        .await
    }

    /// A server configured by `setup`, which also returns the handlers to run.
    pub async fn spawn_with_handlers_from(
        setup: impl FnOnce(&mut Config) -> RegistryBuilder,
    ) -> TestApp {
        Self::spawn_on(setup, |store| store).await
    }

    /// Like [`TestApp::spawn_with_handlers_from`], with the store the test's SQLite file
    /// opens passed through `wrap` (to observe what the application does with it).
    pub async fn spawn_on(
        setup: impl FnOnce(&mut Config) -> RegistryBuilder,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        // Fast polling and retries, so tests wait milliseconds, not the production schedule.
        config.dispatch.poll_interval = Duration::from_millis(20);
        config.dispatch.retry_schedule = vec![Duration::from_millis(30); 3];
        config.dispatch.retry_jitter = 0.0;
        let handlers = setup(&mut config);
        let callback_path = config.callback.path.clone();
        let store = wrap(
            dinghook::store::open(&config.store)
                .await
                .expect("open store"),
        );
        let app = Application::builder(config)
            .handlers(handlers)
            .with_store(store)
            .build()
            .await
            .expect("build app");
        let addr = app.local_addr();
        let ops_addr = app.ops_addr();
        let api_addr = app.api_addr();
        let store = app.store();
        let dispatcher = Some(app.dispatcher());
        let reloader = app.reloader();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = stopped.await;
            })
            .await
            .expect("server");
        });
        TestApp {
            addr,
            ops_addr,
            api_addr,
            store,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            db_path: dir.path().join("dinghook.db"),
            callback_path,
            dispatcher,
            reloader,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs a signed request with the given query string and body.
    pub async fn post_raw(&self, query: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}?{}", self.url(&self.callback_path), query))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn post_sealed(&self, sealed: &Sealed) -> reqwest::Response {
        self.post_raw(&sealed.query(), sealed.body()).await
    }

    /// Encrypts and signs `msg` with the test keys and posts it.
    pub async fn post_event(&self, msg: &str) -> reqwest::Response {
        self.post_sealed(&seal(&sender(), msg)).await
    }

    /// A URL on the operator listener.
    pub fn ops_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.ops_addr.expect("an operator listener"),
            path
        )
    }

    /// The Prometheus text of `/metrics` (on the operator listener).
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(self.ops_url("/metrics"))
            .send()
            .await
            .expect("metrics");
        response.text().await.expect("metrics text")
    }

    /// Runs the `dinghook` binary against this server's database and returns its stdout;
    /// panics with its stderr if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
            .args(args)
            .env_clear()
            .env(
                "DINGHOOK_STORE_URL",
                format!("sqlite://{}", self.db_path.display()),
            )
            .output()
            .expect("run dinghook");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to 10 s) until the event with `dedup_key` is in `state`, and returns it.
    pub async fn wait_for_state(&self, dedup_key: &str, state: EventState) -> StoredEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let current = self
                .store
                .find_by_dedup_key(dedup_key)
                .await
                .expect("store");
            if let Some(event) = &current {
                if event.state == state {
                    return event.clone();
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{dedup_key} did not reach {state:?}: {current:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

/// Asserts a DingTalk-acceptable reply: exactly the four string fields, a valid signature,
/// and `success` inside.
/// Waits (up to 10 s, looking every 20 ms) until `done` holds; fails naming `what`.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn assert_success_reply(response: reqwest::Response) {
    assert_eq!(response.status(), 200);
    let value: serde_json::Value = response.json().await.expect("json reply");
    let object = value.as_object().expect("object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["encrypt", "msg_signature", "nonce", "timeStamp"]);
    assert!(object.values().all(|v| v.is_string()), "{value}");
    let reply: Sealed = serde_json::from_value(value).expect("sealed");
    assert_eq!(reply.timestamp.len(), 13, "epoch milliseconds");
    assert!((now_millis() - reply.timestamp.parse::<i64>().expect("number")).abs() < 60_000);
    assert_eq!(reply.nonce.len(), 16);
    assert!(!reply.encrypt.contains('\n'));
    let msg = sender()
        .open(
            &reply.msg_signature,
            &reply.timestamp,
            &reply.nonce,
            &reply.encrypt,
        )
        .expect("reply verifies and decrypts");
    assert_eq!(msg, b"success");
}

/// Asserts a JSON error with the given status and code.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status, "expected {code}");
    let value: serde_json::Value = response.json().await.expect("json error");
    assert_eq!(value["error"]["code"], code, "{value}");
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{value}"
    );
}

/// A free loopback port (bound, then released for the child process to take).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports: the listeners are held until all are chosen (two `free_port`
/// calls in a row may get the same port back from the kernel).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("free port").port())
}

/// The `fake-dingtalk` binary (another package of the workspace, so no `CARGO_BIN_EXE_` for it):
/// `target/<profile>/fake-dingtalk` next to this test's `deps` directory. Built once per test
/// process with `$CARGO build -p fake-dingtalk` (same profile) if it is missing or older than
/// the fake's sources, so running one test target after editing the fake does not use a stale
/// fake.
pub fn fake_dingtalk_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current test executable");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(std::path::Path::parent)
            .expect("target/<profile>/deps/<test>")
            .to_path_buf();
        let bin = profile_dir.join(format!("fake-dingtalk{}", std::env::consts::EXE_SUFFIX));
        let crate_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/fake-dingtalk");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_none_or(|built| newest_mtime(&crate_dir).is_some_and(|src| src > built)) {
            let mut cargo = std::process::Command::new(env!("CARGO"));
            cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "build",
                "--quiet",
                "-p",
                "fake-dingtalk",
                "--bin",
                "fake-dingtalk",
            ]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("run cargo build -p fake-dingtalk");
            assert!(status.success(), "cargo build -p fake-dingtalk failed");
        }
        assert!(
            bin.is_file(),
            "no fake-dingtalk binary at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

/// The newest modification time of the fake's manifest and sources.
fn newest_mtime(crate_dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = std::fs::metadata(crate_dir.join("Cargo.toml"))
        .and_then(|m| m.modified())
        .ok();
    let mut dirs = vec![crate_dir.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if let Ok(modified) = meta.modified() {
                newest = newest.max(Some(modified));
            }
        }
    }
    newest
}

/// The real `dinghook` binary, configured only through the environment, as the container
/// image runs it.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub port: u16,
    /// The operator listener's port (`/metrics`), unless `env` turned it off.
    pub ops_port: u16,
    pub log: PathBuf,
}

impl ServerProcess {
    pub async fn start(
        db: &std::path::Path,
        port: u16,
        extra_env: &[(&str, &str)],
    ) -> ServerProcess {
        // Beside the database's directory, which the server itself must create.
        let log_dir = db.parent().and_then(|d| d.parent()).unwrap_or(db);
        let url = format!("sqlite://{}", db.display());
        let mut env = vec![("DINGHOOK_STORE_URL", url.as_str())];
        env.extend_from_slice(extra_env);
        Self::start_program(
            env!("CARGO_BIN_EXE_dinghook"),
            &["serve"],
            log_dir,
            port,
            &env,
        )
        .await
    }

    /// Starts `program args…` as a dinghook server configured through the environment
    /// (`DINGHOOK_STORE_URL` must be among `env`), logging into `log_dir`.
    pub async fn start_program(
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        log_dir: &std::path::Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let log = log_dir.join(format!("dinghook-{port}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // Not the public port, which the caller chose with its listener already closed.
        let ops_port = std::iter::repeat_with(free_port)
            .find(|p| *p != port)
            .expect("a free port");
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("DINGHOOK_LISTEN", format!("127.0.0.1:{port}"))
            .env("DINGHOOK_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
            .env("DINGHOOK_TOKEN", TOKEN)
            .env("DINGHOOK_AES_KEY", AES_KEY)
            .env("DINGHOOK_OWNER_KEY", OWNER_KEY)
            .env("DINGHOOK_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn dinghook");
        let server = ServerProcess {
            child,
            port,
            ops_port,
            log,
        };
        server.wait_healthy().await;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A URL on the operator listener.
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.ops_port, path)
    }

    async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("dinghook did not become healthy; log:\n{log}");
    }

    /// SIGKILL: no chance to flush anything.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for a graceful exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("graceful exit in time")
            .expect("exit status")
    }
}

/// Posts `msg` signed and encrypted as DingTalk would; true only when acknowledged with a reply
/// that verifies and decrypts (what DingTalk counts as delivered).
pub async fn deliver(client: &reqwest::Client, url: &str, msg: &str) -> bool {
    let cipher = sender();
    let sealed = seal(&cipher, msg);
    let Ok(response) = client
        .post(format!("{url}?{}", sealed.query()))
        .body(sealed.body())
        .send()
        .await
    else {
        return false;
    };
    if response.status() != 200 {
        return false;
    }
    let Ok(reply) = response.json::<Sealed>().await else {
        return false;
    };
    cipher
        .open(
            &reply.msg_signature,
            &reply.timestamp,
            &reply.nonce,
            &reply.encrypt,
        )
        .is_ok()
}

/// Asserts that none of `secrets` appears in `text` (a captured log, an error body). The
/// message names the secret by position only, so a failing test does not print it either.
pub fn assert_no_secrets(text: &str, secrets: &[&str]) {
    for (i, secret) in secrets.iter().enumerate() {
        assert!(
            !secret.is_empty(),
            "secret #{i} is empty: nothing to look for"
        );
        assert!(
            !text.contains(secret),
            "secret #{i} (of {}) appears in the text ({} bytes)",
            secrets.len(),
            text.len()
        );
    }
}
