//! Stores for the backend-generic tests: a fresh SQLite file, or a fresh PostgreSQL database
//! when `DINGHOOK_TEST_PG_URL` is set (`.ci/run` sets it).
#![allow(dead_code)]

use std::sync::Arc;

use dinghook::config::Config;
use dinghook::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store and what keeps it alive; `url` reopens the same data.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn open_url(url: &str) -> Arc<dyn Store> {
    let mut config = Config::default();
    config.store.url = url.to_owned();
    dinghook::store::open(&config).await.expect("open store")
}

/// A fresh, empty store of `backend`, or `None` (with the reason printed) if that backend is
/// not available on this machine.
pub async fn fresh(backend: Backend) -> Option<TestStore> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            Some(TestStore {
                store: open_url(&url).await,
                url,
                _dir: Some(dir),
            })
        }
        Backend::Postgres => {
            let url = fresh_postgres_database().await?;
            Some(TestStore {
                store: open_url(&url).await,
                url,
                _dir: None,
            })
        }
    }
}

/// Creates a new database on the server named by `DINGHOOK_TEST_PG_URL` and returns its URL.
pub async fn fresh_postgres_database() -> Option<String> {
    let Ok(admin) = std::env::var("DINGHOOK_TEST_PG_URL") else {
        eprintln!(
            "SKIPPED (PostgreSQL): DINGHOOK_TEST_PG_URL is not set; \
             set it to e.g. postgres://postgres@127.0.0.1:5432/test to run these tests"
        );
        return None;
    };
    let _ = admin;
    eprintln!("SKIPPED (PostgreSQL): the PostgreSQL store is not built yet");
    None
}
