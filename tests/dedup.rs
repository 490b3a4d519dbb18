//! De-duplication keys from outside: through the real server, on SQLite and PostgreSQL
//! (when `DINGHOOK_TEST_PG_URL` is set), and across the upgrade that changed them
//! (migration 6): a store written by the previous version, with its keys, opened by this one.

mod support;

use dinghook::store::Store;
use support::stores::fresh_postgres_database;
use support::*;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A server that only receives (no dispatcher, so rows stay as the callback left them) on the
/// store at `url`.
async fn server(url: &str) -> TestApp {
    let url = url.to_owned();
    TestApp::spawn_with(move |c| {
        c.store.url = url;
        c.dispatch.enabled = false;
    })
    .await
}

/// A fresh store URL of `backend` (a SQLite file in `dir`), or `None` when PostgreSQL is not
/// available (printed as SKIPPED).
async fn fresh_url(backend: Backend, dir: &std::path::Path) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}", dir.join("old.db").display())),
        Backend::Postgres => fresh_postgres_database().await,
    }
}

async fn count(store: &dyn Store) -> u64 {
    store.count().await.expect("count")
}

async fn id_of(store: &dyn Store, key: &str) -> Option<i64> {
    store
        .find_by_dedup_key(key)
        .await
        .expect("find")
        .map(|e| e.id)
}

const BIG: &str =
    r#"{"EventType":"chat_update_title","eventId":12345678901234567890123,"title":"a"}"#;
const BIG_NEXT: &str =
    r#"{"EventType":"chat_update_title","eventId":12345678901234567890124,"title":"b"}"#;
const ONE_NUMBER: &str = r#"{"EventType":"chat_update_title","eventId":1,"title":"n"}"#;
const ONE_STRING: &str = r#"{"EventType":"chat_update_title","eventId":"1","title":"s"}"#;
const ONE_OTHER_TYPE: &str = r#"{"EventType":"todo_task_create","eventId":1,"taskId":"t"}"#;

async fn ids_keep_their_text(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_url(backend, dir.path()).await else {
        return;
    };
    let app = server(&url).await;
    // Two ids that are one f64 apart from nothing: both stored.
    assert_success_reply(app.post_event(BIG).await).await;
    assert_success_reply(app.post_event(BIG_NEXT).await).await;
    assert_eq!(count(&*app.store).await, 2);
    let big = id_of(&*app.store, "event-number:12345678901234567890123").await;
    let next = id_of(&*app.store, "event-number:12345678901234567890124").await;
    assert!(big.is_some() && next.is_some() && big != next);
    // The number 1 and the string "1" are two events.
    assert_success_reply(app.post_event(ONE_NUMBER).await).await;
    assert_success_reply(app.post_event(ONE_STRING).await).await;
    assert_eq!(count(&*app.store).await, 4);
    assert!(id_of(&*app.store, "event-number:1").await.is_some());
    assert!(id_of(&*app.store, "event:1").await.is_some());
    // eventId names the event whatever its type: the same id under another type is the same
    // event (DingTalk makes the id unique per event; another source may type it otherwise).
    assert_success_reply(app.post_event(ONE_OTHER_TYPE).await).await;
    // The same event posted again, every kind: acknowledged, stored once.
    for msg in [BIG, BIG_NEXT, ONE_NUMBER, ONE_STRING, BIG] {
        assert_success_reply(app.post_event(msg).await).await;
    }
    assert_eq!(count(&*app.store).await, 4);
    let stored = app
        .store
        .get(big.unwrap())
        .await
        .unwrap()
        .expect("the first big id");
    assert_eq!(stored.payload, BIG, "kept exactly as received");
    app.stop().await;
}

#[tokio::test]
async fn sqlite_ids_keep_their_text() {
    ids_keep_their_text(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_ids_keep_their_text() {
    ids_keep_their_text(Backend::Postgres).await;
}

// --- the upgrade -------------------------------------------------------------------------

/// The schema migrations 1 to 5 leave (tables and indexes; the views are left out, nothing
/// here reads them), in each dialect, written out as the previous version made it.
const SQLITE_AT_5: &str = r#"
CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key       TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    corp_id         TEXT,
    payload         TEXT    NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'push',
    received_at     INTEGER NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'retry', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL,
    handled         TEXT
);
CREATE INDEX events_type ON events (event_type);
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_waiting ON events (next_attempt_at, id) WHERE state IN ('pending', 'retry');
CREATE INDEX events_leased ON events (lease_until) WHERE state = 'running';
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls INTEGER NOT NULL);
CREATE TABLE documents (
    collection TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE INDEX documents_updated ON documents (collection, updated_at);
PRAGMA user_version = 5;
"#;

const POSTGRES_AT_5: &str = r#"
CREATE TABLE events (
    id              BIGSERIAL PRIMARY KEY,
    dedup_key       TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    corp_id         TEXT,
    payload         TEXT    NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'push',
    received_at     BIGINT  NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'retry', 'done', 'dead')),
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT,
    last_error      TEXT,
    updated_at      BIGINT  NOT NULL,
    handled         TEXT
);
CREATE INDEX events_type ON events (event_type);
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_waiting ON events (next_attempt_at, id) WHERE state IN ('pending', 'retry');
CREATE INDEX events_leased ON events (lease_until) WHERE state = 'running';
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at BIGINT NOT NULL);
CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls BIGINT NOT NULL);
CREATE TABLE documents (
    collection TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    body       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE INDEX documents_updated ON documents (collection, updated_at);
CREATE TABLE dinghook_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL);
INSERT INTO dinghook_migrations (version, applied_at) VALUES (1, 0), (2, 0), (3, 0), (4, 0), (5, 0);
"#;

/// The big id as the previous version keyed it: through f64, printed by serde_json.
const OLD_BIG_KEY: &str = "event:1.2345678901234568e+22";
const BIZ_NUMBER: &str = r#"{"EventType":"attendance_check_record","BizId":77}"#;
const BIZ_STRING: &str = r#"{"EventType":"attendance_check_record","BizId":"b-1"}"#;
const STRING_ID: &str = r#"{"EventType":"chat_update_title","eventId":"e-abc","title":"x"}"#;
const INTERNAL: &str = r#"{"EventType":"dinghook_send_result_check","task_id":1}"#;

/// Rows as the previous version stored them: (key, payload, source, state).
const OLD_ROWS: &[(&str, &str, &str, &str)] = &[
    (OLD_BIG_KEY, BIG, "push", "retry"),
    ("event:1", ONE_NUMBER, "recovery", "done"),
    ("event:e-abc", STRING_ID, "push", "done"),
    ("biz:attendance_check_record:77", BIZ_NUMBER, "push", "done"),
    (
        "biz:attendance_check_record:b-1",
        BIZ_STRING,
        "push",
        "done",
    ),
    ("send-result:1", INTERNAL, "internal", "pending"),
];

/// What the built-in handlers recorded against the big id before the upgrade: the effect of a
/// welcome already sent, and a to-do change it claimed. (collection, key, body)
fn old_documents() -> Vec<(&'static str, String, String)> {
    vec![
        (
            "effect",
            format!("{OLD_BIG_KEY}/welcome"),
            r#"{"sent":true}"#.to_owned(),
        ),
        (
            "todo_claim",
            "task-1:done".to_owned(),
            serde_json::json!({ "event": OLD_BIG_KEY }).to_string(),
        ),
        (
            "effect",
            "event:e-abc/welcome".to_owned(),
            r#"{"sent":true}"#.to_owned(),
        ),
    ]
}

/// Writes a store at migration 5 holding [`OLD_ROWS`] and [`old_documents`], with raw SQL.
async fn write_old_store(backend: Backend, url: &str) {
    match backend {
        Backend::Sqlite => {
            let path = url.strip_prefix("sqlite://").unwrap();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch(SQLITE_AT_5).unwrap();
            for (key, payload, source, state) in OLD_ROWS {
                conn.execute(
                    "INSERT INTO events (dedup_key, event_type, payload, source, state, \
                     received_at, next_attempt_at, updated_at) \
                     VALUES (?1, json_extract(?2, '$.EventType'), ?2, ?3, ?4, 1, 1, 1)",
                    rusqlite::params![key, payload, source, state],
                )
                .unwrap();
            }
            for (collection, key, body) in old_documents() {
                conn.execute(
                    "INSERT INTO documents VALUES (?1, ?2, ?3, 1, 1)",
                    rusqlite::params![collection, key, body],
                )
                .unwrap();
            }
        }
        Backend::Postgres => {
            let client = pg_client(url).await;
            client.batch_execute(POSTGRES_AT_5).await.unwrap();
            for (key, payload, source, state) in OLD_ROWS {
                client
                    .execute(
                        "INSERT INTO events (dedup_key, event_type, payload, source, state, \
                         received_at, next_attempt_at, updated_at) \
                         VALUES ($1, ($2::text)::jsonb ->> 'EventType', $2, $3, $4, 1, 1, 1)",
                        &[key, payload, source, state],
                    )
                    .await
                    .unwrap();
            }
            for (collection, key, body) in old_documents() {
                client
                    .execute(
                        "INSERT INTO documents VALUES ($1, $2, $3, 1, 1)",
                        &[&collection, &key, &body],
                    )
                    .await
                    .unwrap();
            }
        }
    }
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

async fn events_stored_before_the_upgrade_are_still_duplicates(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_url(backend, dir.path()).await else {
        return;
    };
    write_old_store(backend, &url).await;
    let app = server(&url).await;
    let rows = OLD_ROWS.len() as u64;
    assert_eq!(count(&*app.store).await, rows);

    // Re-keyed from their payloads: the numbers; the others keep their keys.
    let big = id_of(&*app.store, "event-number:12345678901234567890123")
        .await
        .expect("the big id re-keyed");
    assert_eq!(id_of(&*app.store, OLD_BIG_KEY).await, None);
    assert!(id_of(&*app.store, "event-number:1").await.is_some());
    assert!(id_of(&*app.store, "event:1").await.is_none());
    assert!(id_of(&*app.store, "biz-number:attendance_check_record:77")
        .await
        .is_some());
    for key in [
        "event:e-abc",
        "biz:attendance_check_record:b-1",
        "send-result:1",
    ] {
        assert!(id_of(&*app.store, key).await.is_some(), "{key} kept");
    }
    // What the handlers recorded against the big id follows it, so a retry does not send
    // the welcome again nor lose its claim.
    assert!(app
        .store
        .get_document("effect", "event-number:12345678901234567890123/welcome")
        .await
        .unwrap()
        .is_some());
    assert!(app
        .store
        .get_document("effect", &format!("{OLD_BIG_KEY}/welcome"))
        .await
        .unwrap()
        .is_none());
    let claim = app
        .store
        .get_document("todo_claim", "task-1:done")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        claim.body,
        serde_json::json!({ "event": "event-number:12345678901234567890123" })
    );
    assert!(app
        .store
        .get_document("effect", "event:e-abc/welcome")
        .await
        .unwrap()
        .is_some());

    // Every event stored before the upgrade, delivered again: a duplicate.
    for msg in [BIG, ONE_NUMBER, STRING_ID, BIZ_NUMBER, BIZ_STRING] {
        assert_success_reply(app.post_event(msg).await).await;
    }
    assert_eq!(count(&*app.store).await, rows);
    assert_eq!(
        id_of(&*app.store, "event-number:12345678901234567890123").await,
        Some(big)
    );
    // Distinct events the old keys confused: stored.
    assert_success_reply(app.post_event(BIG_NEXT).await).await;
    assert_success_reply(app.post_event(ONE_STRING).await).await;
    assert_eq!(count(&*app.store).await, rows + 2);
    assert!(id_of(&*app.store, "event-number:12345678901234567890124")
        .await
        .is_some());
    assert!(id_of(&*app.store, "event:1").await.is_some());
    app.stop().await;

    // Opening it again runs nothing more.
    let app = server(&url).await;
    assert_eq!(count(&*app.store).await, rows + 2);
    assert_success_reply(app.post_event(BIG).await).await;
    assert_eq!(count(&*app.store).await, rows + 2);
    app.stop().await;
}

#[tokio::test]
async fn sqlite_events_stored_before_the_upgrade_are_still_duplicates() {
    events_stored_before_the_upgrade_are_still_duplicates(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_events_stored_before_the_upgrade_are_still_duplicates() {
    events_stored_before_the_upgrade_are_still_duplicates(Backend::Postgres).await;
}
