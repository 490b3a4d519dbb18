//! Retention end to end: a real `dinghook serve` process on a store holding events and
//! records of various ages prunes what its retention allows, and only that. What is left is
//! read with the database's own driver (rusqlite, tokio-postgres), not through dinghook.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use dinghook::store::{EventState, Inserted, NewEvent, Source, Store};
use support::stores::{fresh_postgres_database, open_url};
use support::ServerProcess;

const DAY: i64 = 86_400_000;

fn event(key: &str, received_at: i64) -> NewEvent {
    NewEvent {
        app: "default".into(),
        dedup_key: key.to_owned(),
        event_type: "crm_custom".into(),
        corp_id: None,
        payload: format!(r#"{{"EventType":"crm_custom","eventId":"{key}"}}"#),
        source: Source::Push,
        received_at,
        routes: Vec::new(),
    }
}

/// Stores `key`, received and ended `age_days` ago in `state`.
async fn ended(store: &dyn Store, key: &str, age_days: i64, state: EventState) {
    let at = dinghook::time::now_millis() - age_days * DAY;
    let Inserted::Stored { id } = store.insert(event(key, at)).await.unwrap() else {
        panic!("{key} is new")
    };
    let claimed = store.claim("setup", 1, 1_000, at).await.unwrap();
    assert_eq!(claimed[0].id, id);
    let ok = match state {
        EventState::Dead => store.mark_dead(id, "setup", "no", &[], at).await,
        _ => store.mark_done(id, "setup", at).await,
    };
    assert!(ok.unwrap());
}

/// The store as the test leaves it for the server: events and records of every age.
async fn fill(url: &str) {
    let store = open_url(url).await;
    // Oldest first, as DingTalk would have sent them.
    ended(&*store, "dead-40d", 40, EventState::Dead).await;
    for i in 0..3 {
        ended(&*store, &format!("done-10d-{i}"), 10, EventState::Done).await;
    }
    ended(&*store, "dead-10d", 10, EventState::Dead).await;
    ended(&*store, "done-2d", 2, EventState::Done).await;
    let now = dinghook::time::now_millis();
    let body = serde_json::json!({"x": 1});
    store
        .put_document("audit", "old", &body, now - 100 * DAY)
        .await
        .unwrap();
    store
        .put_document("audit", "new", &body, now - DAY)
        .await
        .unwrap();
    store
        .put_document("effect", "event:done-10d-0/notify", &body, now - 40 * DAY)
        .await
        .unwrap();
    store
        .put_document("effect", "event:done-2d/notify", &body, now - 2 * DAY)
        .await
        .unwrap();
    store
        .put_document("group", "cid-old", &body, now - 400 * DAY)
        .await
        .unwrap();
    store.close().await;
}

/// What is left: (event keys, (collection, key) of documents, runs).
type Left = (BTreeSet<String>, BTreeSet<(String, String)>, i64);

async fn left(url: &str) -> Left {
    let events = "SELECT dedup_key FROM events";
    let documents = "SELECT collection, key FROM documents";
    let runs = "SELECT COUNT(*) FROM event_runs";
    match url.strip_prefix("sqlite://") {
        Some(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            let keys = conn
                .prepare(events)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let docs = conn
                .prepare(documents)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let runs = conn.query_row(runs, [], |r| r.get(0)).unwrap();
            (keys, docs, runs)
        }
        None => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let keys = client
                .query(events, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let docs = client
                .query(documents, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let runs = client.query_one(runs, &[]).await.unwrap().get(0);
            (keys, docs, runs)
        }
    }
}

async fn prunes_what_retention_allows(url: String, db: &std::path::Path) {
    fill(&url).await;
    let env = [
        ("DINGHOOK_STORE_URL", url.as_str()),
        ("DINGHOOK_RETENTION_INTERVAL", "1s"),
        ("DINGHOOK_RECOVERY", "off"),
    ];
    let dir = db.parent().unwrap();
    let port = support::free_port();
    let server =
        ServerProcess::start_program(env!("CARGO_BIN_EXE_dinghook"), &["serve"], dir, port, &env)
            .await;
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let scrape = || async {
        http.get(server.ops_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let metrics = loop {
        let metrics = scrape().await;
        if metrics.contains(r#"dinghook_pruned_total{app="default",what="audit"} 1"#) {
            break metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing pruned in 20 s: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (what, n) in [("done", 3), ("dead", 1), ("effect", 1)] {
        let line = format!(r#"dinghook_pruned_total{{app="default",what="{what}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let (keys, docs, runs) = left(&url).await;
    let keys: Vec<_> = keys.into_iter().collect();
    // A dead event is kept a month, a done one a week.
    assert_eq!(keys, ["dead-10d", "done-2d"]);
    assert_eq!(runs, 2, "the pruned events' runs went with them");
    let docs: Vec<_> = docs
        .iter()
        .map(|(c, k)| format!("{c}/{k}"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        docs,
        ["audit/new", "effect/event:done-2d/notify", "group/cid-old"],
        "a handler's state (group) is not pruned, however old"
    );
    // The queue figures follow (the maintained counts): one done and one dead left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = scrape().await;
        let done = r#"dinghook_queue_depth{app="default",state="done"} 1"#;
        let dead = r#"dinghook_queue_depth{app="default",state="dead"} 1"#;
        if metrics.contains(done) && metrics.contains(dead) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("retention: pruned"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_prunes_what_retention_allows_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    prunes_what_retention_allows(format!("sqlite://{}", db.display()), &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_prunes_what_retention_allows_on_postgres() {
    let Some(url) = fresh_postgres_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    prunes_what_retention_allows(url, &dir.path().join("unused.db")).await;
}
