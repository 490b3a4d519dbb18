//! Test helpers: start the real server on a random port with a fresh SQLite file, and send it
//! what DingTalk sends.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dinghook::app::Application;
use dinghook::config::Config;
use dinghook::crypto::{now_millis, random_nonce, CallbackCipher, Sealed};
use dinghook::secret::Secret;
use dinghook::store::Store;

pub const TOKEN: &str = "test-token-9f8e7d";
pub const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub const OWNER_KEY: &str = "dingtestappkey";

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".into();
    config.callback.token = Secret::new(TOKEN.into());
    config.callback.aes_key = Secret::new(AES_KEY.into());
    config.callback.owner_key = OWNER_KEY.into();
    config.store.url = format!("sqlite://{}", dir.join("dinghook.db").display());
    config
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
    pub store: Arc<dyn Store>,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    pub callback_path: String,
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
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        customize(&mut config);
        let callback_path = config.callback.path.clone();
        let app = Application::build(config).await.expect("build app");
        let addr = app.local_addr();
        let store = app.store();
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
            store,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            db_path: dir.path().join("dinghook.db"),
            callback_path,
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
