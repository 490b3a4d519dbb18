//! Shared set-up for tests that drive the DingTalk client against the fake over real HTTP.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinghook::dingtalk::{Client, ClientConfig, MemoryCounter, Secret};
use fake_dingtalk::FakeDingTalk;

pub const APP_KEY: &str = "dingtestappkey";
pub const APP_SECRET: &str = "test-app-secret-do-not-log";
pub const AGENT_ID: i64 = 4242;

/// A fake on loopback and a client pointed at it (both base URLs), with quick retries so tests
/// stay fast and a high QPS so only the tests about the limiter feel it.
pub struct TestDingTalk {
    pub fake: FakeDingTalk,
    pub base_url: String,
    pub client: Client,
    pub counter: Arc<MemoryCounter>,
}

pub fn test_config(base_url: &str) -> ClientConfig {
    ClientConfig {
        app_key: APP_KEY.into(),
        app_secret: Secret::new(APP_SECRET),
        agent_id: Some(AGENT_ID),
        oapi_url: base_url.into(),
        api_url: base_url.into(),
        qps: 10_000,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        retry_base_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(40),
        max_ban_wait: Duration::from_secs(3),
        ..ClientConfig::default()
    }
}

pub async fn start() -> TestDingTalk {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut ClientConfig)) -> TestDingTalk {
    let (fake, base_url) = FakeDingTalk::spawn().await.expect("fake DingTalk starts");
    fake.set_credentials(APP_KEY, APP_SECRET);
    let mut config = test_config(&base_url);
    tweak(&mut config);
    let counter = Arc::new(MemoryCounter::new());
    let client = Client::new(config, counter.clone()).expect("client builds");
    TestDingTalk {
        fake,
        base_url,
        client,
        counter,
    }
}

impl TestDingTalk {
    /// Adds the user most tests look up.
    pub fn with_alice(self) -> Self {
        self.fake.add_user(serde_json::json!({
            "userid": "alice", "unionid": "union-alice", "name": "Alice",
            "mobile": "13800000000", "dept_id_list": [1, 2], "active": true, "title": "Engineer"
        }));
        self
    }

    /// Calls recorded on a path.
    pub fn calls(&self, path: &str) -> Vec<fake_dingtalk::RecordedCall> {
        self.fake.calls_to(path)
    }

    /// The monthly total in the counter.
    pub async fn counted(&self) -> u64 {
        self.client.quota().await.used
    }
}

/// Log lines captured from `tracing`, for asserting that a warning was written.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Installs a subscriber for the current thread; keep the guard alive for the test.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
