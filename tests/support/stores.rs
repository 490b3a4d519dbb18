//! Stores for the backend-generic tests: a fresh SQLite file, or a fresh PostgreSQL database
//! when `DINGHOOK_TEST_PG_URL` is set (`.ci/run` sets it).
#![allow(dead_code)]

use std::sync::Arc;

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
    let config = dinghook::store::StoreConfig {
        url: url.to_owned(),
        ..Default::default()
    };
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

/// Test databases are named `dinghook_test_<unix seconds>_<random>`; those older than this are
/// leftovers of earlier runs and are dropped, so CI machines do not fill up.
const STALE_AFTER_SECS: u64 = 3600;

/// Creates a new database on the server named by `DINGHOOK_TEST_PG_URL` and returns its URL.
pub async fn fresh_postgres_database() -> Option<String> {
    let Ok(admin) = std::env::var("DINGHOOK_TEST_PG_URL") else {
        eprintln!(
            "SKIPPED (PostgreSQL): DINGHOOK_TEST_PG_URL is not set; \
             set it to e.g. postgres://postgres@127.0.0.1:5432/test to run these tests"
        );
        return None;
    };
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("DINGHOOK_TEST_PG_URL is set but unreachable: {e:?}"));
    let connection = tokio::spawn(connection);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    drop_stale_databases(&client, now).await;

    let name = format!("dinghook_test_{now}_{:08x}", rand::random::<u32>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
    drop(client);
    let _ = connection.await;
    Some(with_database(&admin, &name))
}

async fn drop_stale_databases(client: &tokio_postgres::Client, now: u64) {
    let rows = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'dinghook\\_test\\_%'",
            &[],
        )
        .await
        .expect("list test databases");
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix("dinghook_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        let Some(created) = created else { continue };
        if now.saturating_sub(created) < STALE_AFTER_SECS {
            continue;
        }
        // Another test process may be dropping the same one; losing that race is fine.
        // FORCE (PostgreSQL 13+) ends sessions a killed test run left behind.
        if client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .is_err()
        {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                .await;
        }
    }
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}
