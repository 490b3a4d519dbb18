//! `/metrics` and `dinghook events stats` read counts the store keeps (migrations 8 and 11),
//! never the events table: a scrape costs the same with 200 000 events as with 10, a crowd of
//! scrapers costs one store read, and the counts, of all and of each app, stay exact through
//! every kind of write, upgrades included, on SQLite and on PostgreSQL (when
//! `DINGHOOK_TEST_PG_URL` is set, else SKIPPED).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dinghook::handler::RegistryBuilder;
use dinghook::store::postgres::PostgresStore;
use dinghook::store::{EventState, Inserted, NewEvent, ReplaySelector, Source, Stats, Store};
use dinghook::time::now_millis;
use support::counting::CountingStore;
use support::stores::{fresh, open_url, Backend};
use support::TestApp;

const T0: i64 = 1_800_000_000_000;

fn event(key: &str, event_type: &str, received_at: i64) -> NewEvent {
    app_event("default", key, event_type, received_at)
}

fn app_event(app: &str, key: &str, event_type: &str, received_at: i64) -> NewEvent {
    NewEvent {
        app: app.into(),
        dedup_key: key.to_owned(),
        event_type: event_type.to_owned(),
        corp_id: Some("dingcorp".into()),
        payload: format!(r#"{{"EventType":"{event_type}","eventId":"{key}"}}"#),
        source: Source::Push,
        received_at,
        routes: Vec::new(),
    }
}

// --- a real server with many events ----------------------------------------------------------

/// The state of bulk event `i`: most done, some of every other state.
fn bulk_state(i: u64) -> &'static str {
    match i % 20 {
        0 => "pending",
        1 => "retry",
        2 | 3 => "dead",
        4 => "running",
        _ => "done",
    }
}

/// The app of bulk event `i`: one in three is `ops`'s, the rest `default`'s.
fn bulk_app(i: u64) -> &'static str {
    if i % 3 == 1 {
        "ops"
    } else {
        "default"
    }
}

/// Writes `n` events straight into the SQLite file (one statement; the triggers count them),
/// received an hour ago and onwards, each due when received (`ops`'s half an hour later; the
/// server runs no dispatcher). Returns (app, type, state) → count as it should be
/// reported.
fn bulk_insert(db: &std::path::Path, n: u64) -> Counts {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let start = now_millis() - 3_600_000;
    let lease_until = now_millis() + 86_400_000;
    conn.execute_batch(&format!(
        "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < {n}) \
         INSERT INTO events (dedup_key, event_type, corp_id, payload, source, received_at, \
             state, attempts, next_attempt_at, lease_owner, lease_until, updated_at, app) \
         SELECT 'bulk:' || i, 'type_' || (i % 7), 'dingcorp', '{{}}', 'push', {start} + i, \
             CASE i % 20 WHEN 0 THEN 'pending' WHEN 1 THEN 'retry' WHEN 2 THEN 'dead' \
                 WHEN 3 THEN 'dead' WHEN 4 THEN 'running' ELSE 'done' END, \
             1, CASE i % 3 WHEN 1 THEN {start} + 1800000 + i ELSE {start} + i END, \
             CASE i % 20 WHEN 4 THEN 'elsewhere' END, \
             CASE i % 20 WHEN 4 THEN {lease_until} END, {start} + i, \
             CASE i % 3 WHEN 1 THEN 'ops' ELSE 'default' END \
         FROM s"
    ))
    .unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..n {
        *expected
            .entry((
                bulk_app(i).to_owned(),
                format!("type_{}", i % 7),
                bulk_state(i).to_owned(),
            ))
            .or_insert(0) += 1;
    }
    expected
}

/// The value of the sample `name` (with its labels, as written) in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn spawn_counted() -> (TestApp, Arc<CountingStore>) {
    let counting = Mutex::new(None);
    let app = TestApp::spawn_on(
        |config| {
            // Nothing claims the events written behind the server's back.
            config.dispatch.enabled = false;
            RegistryBuilder::new()
        },
        |store| {
            let c = CountingStore::new(store);
            *counting.lock().unwrap() = Some(Arc::clone(&c));
            c
        },
    )
    .await;
    let counting = counting.into_inner().unwrap().expect("wrapped");
    (app, counting)
}

/// Sixteen scrapes at once; each answer and how long it took.
async fn scrape_together(app: &TestApp, n: usize) -> Vec<(String, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.ops_url("/metrics"));
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client.get(url).send().await.expect("scrape");
                assert_eq!(response.status(), 200);
                let text = response.text().await.expect("text");
                (text, started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Before the counts were kept, 16 scrapers of 200 000 events each waited for the others'
/// table scans on the handlers' connection: every scrape hit the 2 s time-out and said
/// `dinghook_store_up 0`. Now each answers at once, exactly, and together they cost at most
/// a read or two (one, unless the scrapes straddle the one-second reuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_scrapers_of_200_000_events_answer_fast_exact_and_share_a_read() {
    let (app, counting) = spawn_counted().await;
    let started = Instant::now();
    let expected = bulk_insert(&app.db_path, 200_000);
    eprintln!("200 000 events written in {:?}", started.elapsed());
    counting.reset();

    for round in 0..3 {
        let answers = scrape_together(&app, 16).await;
        for (text, took) in &answers {
            assert!(*took < Duration::from_secs(1), "round {round}: {took:?}");
            assert_eq!(sample(text, "dinghook_store_up"), Some(1.0), "{text}");
            for app in ["default", "ops"] {
                for state in EventState::ALL {
                    let want: u64 = expected
                        .iter()
                        .filter(|((a, _, s), _)| a == app && s == state.as_str())
                        .map(|(_, n)| n)
                        .sum();
                    let line = format!(
                        "dinghook_queue_depth{{app=\"{app}\",state=\"{}\"}}",
                        state.as_str()
                    );
                    assert_eq!(sample(text, &line), Some(want as f64), "{line}");
                }
            }
            // The default app's first waiting event has been due for an hour, ops's for half
            // an hour.
            let age = |app: &str| {
                sample(
                    text,
                    &format!("dinghook_oldest_pending_age_seconds{{app=\"{app}\"}}"),
                )
            };
            let default_age = age("default").unwrap();
            assert!((3_590.0..3_700.0).contains(&default_age), "{default_age}");
            let ops_age = age("ops").unwrap();
            assert!((1_790.0..1_900.0).contains(&ops_age), "{ops_age}");
        }
        let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
        eprintln!("round {round}: 16 scrapes, slowest {slowest:?}");
        let reads = counting.calls().get("stats").copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&reads),
            "16 scrapes at once cost {reads} store reads"
        );
        counting.reset();
        // Past the reuse window: the next round reads again.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }

    // The command line reads the same counts, by type too, of all apps and of one.
    for app_name in [None, Some("ops"), Some("default")] {
        let mut args = vec!["events", "stats", "--json"];
        args.extend(app_name.iter().flat_map(|a| ["--app", a]));
        let stats: serde_json::Value = serde_json::from_str(&app.cli(&args)).unwrap();
        let mut by_type = TypeCounts::new();
        for (t, states) in stats["by_type"].as_object().unwrap() {
            for (s, n) in states.as_object().unwrap() {
                by_type.insert((t.clone(), s.clone()), n.as_u64().unwrap());
            }
        }
        assert_eq!(by_type, by_type_of(&expected, app_name), "{args:?}");
    }
    app.stop().await;
}

/// (type, state) → count, of one app or (`None`) of all.
type TypeCounts = BTreeMap<(String, String), u64>;

fn by_type_of(counts: &Counts, app: Option<&str>) -> TypeCounts {
    let mut out = TypeCounts::new();
    for ((a, t, s), n) in counts {
        if app.is_none_or(|app| app == a) {
            *out.entry((t.clone(), s.clone())).or_insert(0) += n;
        }
    }
    out
}

/// A store slower than the scrape's 2 s: the scrapes waiting together share the one read,
/// give up with it, and still answer with every other metric and `dinghook_store_up 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_of_a_stuck_store_share_one_read_and_still_answer() {
    let (app, counting) = spawn_counted().await;
    // Not due for a day (and no dispatcher), so it stays pending.
    app.store
        .schedule(event("e1", "x", now_millis()), now_millis() + 86_400_000)
        .await
        .unwrap();
    counting.set_stats_delay(Duration::from_secs(3));
    counting.reset();
    let answers = scrape_together(&app, 16).await;
    for (text, took) in &answers {
        assert!(*took < Duration::from_millis(2_800), "{took:?}");
        assert_eq!(sample(text, "dinghook_store_up"), Some(0.0), "{text}");
        assert!(text.contains("dinghook_ack_duration_seconds"), "{text}");
    }
    assert_eq!(counting.calls().get("stats"), Some(&1));

    // The store answers again: the next scrape after the reuse window says so.
    counting.set_stats_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let text = app.metrics().await;
    assert_eq!(sample(&text, "dinghook_store_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "dinghook_queue_depth{app=\"default\",state=\"pending\"}"
        ),
        Some(1.0)
    );
    app.stop().await;
}

/// Each app's queue gauges, from the one read: an app's events of every state, its oldest
/// waiting event; and once an app's events are all gone, its gauges stay, at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_gauges_per_app_and_an_emptied_app_reads_zero() {
    let (app, counting) = spawn_counted().await;
    let now = now_millis();
    for (name, key, due) in [
        ("default", "d1", now - 5_000),
        ("ops", "o1", now - 20_000),
        ("ops", "o2", now + 86_400_000),
    ] {
        app.store
            .schedule(app_event(name, key, "x", now - 30_000), due)
            .await
            .unwrap();
    }
    counting.reset();
    let text = app.metrics().await;
    assert_eq!(
        counting.calls().get("stats"),
        Some(&1),
        "one read for every app"
    );
    let depth = |text: &str, app: &str, state: &str| {
        sample(
            text,
            &format!("dinghook_queue_depth{{app=\"{app}\",state=\"{state}\"}}"),
        )
    };
    let age = |text: &str, app: &str| {
        sample(
            text,
            &format!("dinghook_oldest_pending_age_seconds{{app=\"{app}\"}}"),
        )
    };
    assert_eq!(depth(&text, "default", "pending"), Some(1.0), "{text}");
    assert_eq!(depth(&text, "ops", "pending"), Some(2.0), "{text}");
    assert_eq!(depth(&text, "ops", "dead"), Some(0.0), "{text}");
    let (default_age, ops_age) = (age(&text, "default").unwrap(), age(&text, "ops").unwrap());
    assert!((5.0..8.0).contains(&default_age), "{default_age}");
    assert!((20.0..23.0).contains(&ops_age), "{ops_age}");
    assert!(
        !text.contains("dinghook_queue_depth{state="),
        "no series without an app"
    );

    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    conn.execute("DELETE FROM events WHERE app = 'ops'", [])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let text = app.metrics().await;
    for state in EventState::ALL {
        assert_eq!(depth(&text, "ops", state.as_str()), Some(0.0), "{text}");
    }
    assert_eq!(age(&text, "ops"), Some(0.0), "{text}");
    assert_eq!(depth(&text, "default", "pending"), Some(1.0), "{text}");
    app.stop().await;
}

// --- the counts against the table, on both stores --------------------------------------------

/// A plain connection to a store's database, for what the store API does not do (deletes, as
/// retention will) and for the truth to compare with.
enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

/// (app, type, state) → count.
type Counts = BTreeMap<(String, String, String), u64>;

/// The truth the statistics are compared with: the counts, and each app's earliest
/// `next_attempt_at` of a waiting event.
struct Truth {
    counts: Counts,
    oldest: BTreeMap<String, i64>,
}

impl Raw {
    async fn open(url: &str) -> Raw {
        match url.strip_prefix("sqlite://") {
            Some(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                Raw::Sqlite(conn)
            }
            None => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                Raw::Postgres(client)
            }
        }
    }

    async fn execute(&self, sql: &str) {
        match self {
            Raw::Sqlite(conn) => conn.execute_batch(sql).unwrap(),
            Raw::Postgres(client) => client.batch_execute(sql).await.unwrap(),
        }
    }

    /// What `event_counts` of migrations 8 to 10 (no app) says: (type, state) → count.
    async fn counts_without_app(&self) -> TypeCounts {
        let sql = "SELECT event_type, state, CAST(SUM(n) AS BIGINT) FROM event_counts \
                   GROUP BY event_type, state HAVING SUM(n) <> 0";
        match self {
            Raw::Sqlite(conn) => {
                let mut stmt = conn.prepare(sql).unwrap();
                let rows = stmt
                    .query_map([], |r| {
                        Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64))
                    })
                    .unwrap();
                rows.collect::<Result<_, _>>().unwrap()
            }
            Raw::Postgres(client) => client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64))
                .collect(),
        }
    }

    /// The counts and each app's oldest waiting event, from the events table.
    async fn truth(&self) -> Truth {
        let counts = "SELECT app, event_type, state, COUNT(*) FROM events \
                      GROUP BY app, event_type, state";
        let oldest = "SELECT app, MIN(next_attempt_at) FROM events \
                      WHERE state IN ('pending', 'retry') GROUP BY app";
        match self {
            Raw::Sqlite(conn) => {
                let mut stmt = conn.prepare(counts).unwrap();
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            (r.get(0)?, r.get(1)?, r.get(2)?),
                            r.get::<_, i64>(3)? as u64,
                        ))
                    })
                    .unwrap();
                let counts = rows.collect::<Result<_, _>>().unwrap();
                let mut stmt = conn.prepare(oldest).unwrap();
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
                let oldest = rows.collect::<Result<_, _>>().unwrap();
                Truth { counts, oldest }
            }
            Raw::Postgres(client) => {
                let counts = client
                    .query(counts, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get::<_, i64>(3) as u64))
                    .collect();
                let oldest = client
                    .query(oldest, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                Truth { counts, oldest }
            }
        }
    }
}

/// `stats` (`app` `None`) or `stats_for(app)` agrees with the truth of those events.
fn assert_stats(stats: &Stats, truth: &Truth, app: Option<&str>, now: i64, step: &str) {
    let step = format!("{step} ({})", app.unwrap_or("every app"));
    let counts: Counts = truth
        .counts
        .iter()
        .filter(|((a, ..), _)| app.is_none_or(|app| app == a))
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let by_type: TypeCounts = stats
        .by_type
        .iter()
        .flat_map(|(t, states)| {
            states
                .iter()
                .map(move |(s, n)| ((t.clone(), s.clone()), *n))
        })
        .collect();
    assert_eq!(by_type, by_type_of(&counts, None), "by type after {step}");
    let in_state = |app: Option<&str>, state: EventState| -> u64 {
        counts
            .iter()
            .filter(|((a, _, s), _)| s == state.as_str() && app.is_none_or(|app| app == a))
            .map(|(_, n)| n)
            .sum()
    };
    let age = |due: Option<&i64>| due.map(|t| (now - t).max(0));
    // Every app with events, and the one asked for even without.
    let mut apps: BTreeSet<String> = counts.keys().map(|(a, ..)| a.clone()).collect();
    apps.extend(app.map(str::to_owned));
    assert_eq!(
        stats.by_app.keys().cloned().collect::<BTreeSet<_>>(),
        apps,
        "apps after {step}"
    );
    for state in EventState::ALL {
        assert_eq!(
            stats.by_state[state.as_str()],
            in_state(None, state),
            "{state:?} after {step}"
        );
        for a in &apps {
            assert_eq!(
                stats.by_app[a].by_state[state.as_str()],
                in_state(Some(a), state),
                "{a}'s {state:?} after {step}"
            );
        }
    }
    for a in &apps {
        assert_eq!(
            stats.by_app[a].oldest_pending_age_ms,
            age(truth.oldest.get(a)),
            "{a}'s oldest after {step}"
        );
    }
    let oldest = truth
        .oldest
        .iter()
        .filter(|(a, _)| app.is_none_or(|app| app == *a))
        .map(|(_, t)| t)
        .min();
    assert_eq!(
        stats.oldest_pending_age_ms,
        age(oldest),
        "oldest after {step}"
    );
}

/// The store's statistics agree with the table: of every app, by type and state, by state,
/// by app and state, in how long the most overdue waiting event (of all, of each app) has
/// been due; and so do each app's own (`stats_for`), and an app without events's (zeros).
async fn assert_exact(store: &dyn Store, raw: &Raw, step: &str) {
    let now = T0 + 1_000_000;
    let stats = store.stats(now).await.unwrap();
    let truth = raw.truth().await;
    assert_stats(&stats, &truth, None, now, step);
    let apps: BTreeSet<&str> = truth.counts.keys().map(|(a, ..)| a.as_str()).collect();
    for app in apps.into_iter().chain(["no-such-app"]) {
        let stats = store.stats_for(Some(app), now).await.unwrap();
        assert_stats(&stats, &truth, Some(app), now, step);
    }
}

async fn counts_stay_exact_through_every_write(store: Arc<dyn Store>, url: &str) {
    let raw = Raw::open(url).await;
    assert_exact(&*store, &raw, "nothing").await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let t = ["a", "b", "c"][i % 3];
        // Two apps, with types in common.
        let app = ["default", "ops"][i % 4 / 3];
        match store
            .insert(app_event(app, &format!("k{i}"), t, T0 + i as i64))
            .await
        {
            Ok(Inserted::Stored { id }) => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    assert_exact(&*store, &raw, "inserts").await;
    let again = store.insert(event("k0", "a", T0 + 50)).await.unwrap();
    assert_eq!(again, Inserted::Duplicate { id: ids[0] });
    store
        .schedule(event("later", "b", T0 + 20), T0 + 5_000_000)
        .await
        .unwrap();
    store
        .schedule(app_event("ops", "ops-later", "b", T0 + 21), T0 + 6_000_000)
        .await
        .unwrap();
    assert_exact(&*store, &raw, "a duplicate and a scheduled event").await;

    let claimed = store.claim("w1", 6, 1_000, T0 + 100).await.unwrap();
    assert_eq!(claimed.len(), 6);
    assert_exact(&*store, &raw, "a claim").await;
    assert!(store
        .mark_done(claimed[0].id, "w1", T0 + 101)
        .await
        .unwrap());
    assert!(store
        .mark_done(claimed[1].id, "w1", T0 + 101)
        .await
        .unwrap());
    assert!(store
        .mark_retry(claimed[2].id, "w1", T0 + 200, "busy", &[], T0 + 101)
        .await
        .unwrap());
    assert!(store
        .mark_dead(claimed[3].id, "w1", "no", &["h".into()], T0 + 101)
        .await
        .unwrap());
    // An outcome from one who lost the lease changes nothing.
    assert!(!store
        .mark_done(claimed[4].id, "w9", T0 + 101)
        .await
        .unwrap());
    assert_exact(&*store, &raw, "done, retry, dead").await;

    // Leases that ended are claimed again (running stays running), the rest released.
    let reclaimed = store.claim("w2", 10, 1_000, T0 + 2_000).await.unwrap();
    assert!(reclaimed.len() >= 2, "{reclaimed:?}");
    assert_exact(&*store, &raw, "expired leases claimed again").await;
    assert!(store.release(&["w2".into()], T0 + 2_001).await.unwrap() > 0);
    assert_exact(&*store, &raw, "release").await;

    assert_eq!(
        store
            .replay(&ReplaySelector::State(EventState::Dead), T0 + 3_000)
            .await
            .unwrap(),
        1
    );
    assert_exact(&*store, &raw, "replay of the dead").await;
    store
        .replay(&ReplaySelector::Ids(vec![claimed[0].id]), T0 + 3_000)
        .await
        .unwrap();
    store
        .replay(&ReplaySelector::Since(T0 + 6), T0 + 3_000)
        .await
        .unwrap();
    assert_exact(&*store, &raw, "replay by ids and since").await;

    // Once more through to done, so deletes have done events to take.
    let all = store.claim("w3", 100, 1_000, T0 + 4_000).await.unwrap();
    for e in all.iter().take(8) {
        assert!(store.mark_done(e.id, "w3", T0 + 4_001).await.unwrap());
    }
    assert_exact(&*store, &raw, "a second round").await;

    // What no store call does yet, but retention and an operator will.
    raw.execute("UPDATE events SET event_type = 'renamed' WHERE dedup_key = 'k1'")
        .await;
    assert_exact(&*store, &raw, "a type changed").await;
    raw.execute("UPDATE events SET app = 'crm' WHERE dedup_key IN ('k2', 'k3', 'later')")
        .await;
    assert_exact(&*store, &raw, "events moved to another app").await;
    raw.execute("DELETE FROM events WHERE app = 'ops' AND state <> 'done'")
        .await;
    assert_exact(&*store, &raw, "one app's waiting events deleted").await;
    raw.execute("DELETE FROM events WHERE state = 'done'").await;
    assert_exact(&*store, &raw, "done events deleted").await;
    raw.execute("DELETE FROM events WHERE dedup_key = 'later'")
        .await;
    assert_exact(&*store, &raw, "a pending event deleted").await;
    raw.execute("DELETE FROM events").await;
    assert_exact(&*store, &raw, "everything deleted").await;
    let stats = store.stats(T0).await.unwrap();
    assert!(stats.by_type.is_empty(), "{stats:?}");
    assert_eq!(stats.oldest_pending_age_ms, None);
    store.insert(event("k-new", "a", T0 + 9)).await.unwrap();
    assert_exact(&*store, &raw, "an insert after all were deleted").await;
}

/// Statements of many rows, as a replay of every dead event or a retention delete are: each
/// is counted once per statement (PostgreSQL) or in place (SQLite), so 20 000 rows take well
/// under a second, where counting row by row inside one PostgreSQL transaction took minutes.
async fn statements_of_many_rows_are_counted_fast(store: Arc<dyn Store>, url: &str) {
    let raw = Raw::open(url).await;
    let started = Instant::now();
    // In batches of 1 000: one INSERT of many rows is counted row by row (see migration 10).
    for batch in 0..20 {
        let (from, to) = (batch * 1_000, batch * 1_000 + 999);
        let rows = match raw {
            Raw::Sqlite(_) => format!(
                "WITH RECURSIVE s(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM s \
                 WHERE i < {to}) SELECT i FROM s"
            ),
            Raw::Postgres(_) => format!("SELECT i FROM generate_series({from}, {to}) AS i"),
        };
        raw.execute(&format!(
            "INSERT INTO events (dedup_key, event_type, payload, received_at, state, \
                 next_attempt_at, updated_at, app) \
             SELECT 'many:' || i, 'type_' || (i % 3), '{{}}', {T0} + i, 'dead', {T0}, {T0}, \
                 CASE i % 4 WHEN 1 THEN 'ops' ELSE 'default' END \
             FROM ({rows}) AS s"
        ))
        .await;
    }
    eprintln!("20 000 rows written in {:?}", started.elapsed());
    assert_exact(&*store, &raw, "20 000 rows in 20 statements").await;
    let bounded = |what: &str, took: Duration| {
        eprintln!("{what}: {took:?}");
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
    };
    let started = Instant::now();
    let n = store
        .replay(&ReplaySelector::State(EventState::Dead), T0 + 1)
        .await
        .unwrap();
    assert_eq!(n, 20_000);
    bounded("replay of 20 000 dead events", started.elapsed());
    assert_exact(&*store, &raw, "a replay of 20 000").await;
    let started = Instant::now();
    raw.execute("UPDATE events SET state = 'done' WHERE event_type <> 'type_0'")
        .await;
    bounded("an update of 13 333 events", started.elapsed());
    assert_exact(&*store, &raw, "an update of many").await;
    let started = Instant::now();
    raw.execute("DELETE FROM events WHERE state = 'done'").await;
    bounded("a delete of 13 333 events", started.elapsed());
    assert_exact(&*store, &raw, "a delete of many").await;
}

/// What migrations 8 to 10 leave, taken away again, so the database is as the version before the
/// counts (migration 7) left it: `event_counts` is made, and counted, when the store opens it.
async fn back_to_migration_7(raw: &Raw) {
    match raw {
        Raw::Sqlite(_) => {
            raw.execute(
                "DROP TRIGGER events_count_insert; DROP TRIGGER events_count_update; \
                 DROP TRIGGER events_count_delete; \
                 DROP TABLE event_counts; DROP INDEX events_app_waiting; \
                 DROP TABLE deliveries; DROP TABLE route_pauses; \
                 PRAGMA user_version = 7;",
            )
            .await
        }
        Raw::Postgres(_) => {
            raw.execute(
                "DROP TRIGGER events_count_insert ON events; \
                 DROP TRIGGER events_count_update ON events; \
                 DROP TRIGGER events_count_delete ON events; \
                 DROP FUNCTION dinghook_count_insert(); DROP FUNCTION dinghook_count_changes(); \
                 DROP TABLE event_counts; \
                 DROP INDEX events_app_waiting; \
                 DROP TABLE deliveries; DROP TABLE route_pauses; \
                 DELETE FROM dinghook_migrations WHERE version >= 8;",
            )
            .await
        }
    }
}

/// Events written by the version before (no counts kept), then the upgrade: the counts are
/// computed once from the table and kept from then on.
async fn an_older_database_gets_exact_counts_on_upgrade(store: Arc<dyn Store>, url: &str) {
    let raw = Raw::open(url).await;
    back_to_migration_7(&raw).await;
    for i in 0..40 {
        let t = ["a", "b", "c", "d"][i % 4];
        let app = ["default", "ops"][i % 3 / 2];
        store
            .insert(app_event(app, &format!("old{i}"), t, T0 + i as i64))
            .await
            .unwrap();
    }
    let claimed = store.claim("w", 20, 60_000, T0 + 100).await.unwrap();
    for (n, e) in claimed.iter().enumerate() {
        match n % 4 {
            0 => assert!(store.mark_done(e.id, "w", T0 + 101).await.unwrap()),
            1 => assert!(store
                .mark_retry(e.id, "w", T0 + 500, "later", &[], T0 + 101)
                .await
                .unwrap()),
            2 => assert!(store
                .mark_dead(e.id, "w", "no", &[], T0 + 101)
                .await
                .unwrap()),
            _ => {} // still running
        }
    }
    assert!(
        store.stats(T0).await.is_err(),
        "no counts before the upgrade"
    );
    store.close().await;

    let upgraded = open_url(url).await;
    assert_exact(&*upgraded, &raw, "the upgrade").await;
    let more = upgraded.claim("w2", 100, 60_000, T0 + 1_000).await.unwrap();
    for e in &more {
        upgraded.mark_done(e.id, "w2", T0 + 1_001).await.unwrap();
    }
    upgraded
        .insert(event("new", "e", T0 + 2_000))
        .await
        .unwrap();
    assert_exact(&*upgraded, &raw, "writes after the upgrade").await;
    upgraded.close().await;
}

/// Migration 8's `event_counts` and row triggers on SQLite, and its count (frozen: what a
/// database of migrations 8 to 10 has; migration 11 keys the counts by app).
const SQLITE_COUNTS_8: &str = r#"
CREATE TABLE event_counts (
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    shard      INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    PRIMARY KEY (event_type, state, shard)
) WITHOUT ROWID;
CREATE TRIGGER events_count_insert AFTER INSERT ON events BEGIN
    INSERT INTO event_counts (event_type, state, shard, n) VALUES (NEW.event_type, NEW.state, 0, 1)
    ON CONFLICT (event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER events_count_update AFTER UPDATE OF state, event_type ON events
WHEN OLD.state IS NOT NEW.state OR OLD.event_type IS NOT NEW.event_type BEGIN
    INSERT INTO event_counts (event_type, state, shard, n) VALUES (OLD.event_type, OLD.state, 0, -1)
    ON CONFLICT (event_type, state, shard) DO UPDATE SET n = n + excluded.n;
    INSERT INTO event_counts (event_type, state, shard, n) VALUES (NEW.event_type, NEW.state, 0, 1)
    ON CONFLICT (event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER events_count_delete AFTER DELETE ON events BEGIN
    INSERT INTO event_counts (event_type, state, shard, n) VALUES (OLD.event_type, OLD.state, 0, -1)
    ON CONFLICT (event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
INSERT INTO event_counts (event_type, state, shard, n)
    SELECT event_type, state, 0, COUNT(*) FROM events GROUP BY event_type, state;
"#;

/// Migration 8's `event_counts` on PostgreSQL and its count (frozen, as `SQLITE_COUNTS_8`).
const POSTGRES_COUNTS_8: &str = r#"
CREATE TABLE event_counts (
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    shard      INTEGER NOT NULL,
    n          BIGINT  NOT NULL,
    PRIMARY KEY (event_type, state, shard)
);
INSERT INTO event_counts (event_type, state, shard, n)
    SELECT event_type, state, 0, COUNT(*) FROM events GROUP BY event_type, state;
"#;

/// Migration 10's functions and triggers (frozen: a database of migration 10).
const MIGRATION_10_TRIGGERS: &str = r#"
CREATE FUNCTION dinghook_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE event_counts SET n = n + 1
    WHERE event_type = NEW.event_type AND state = NEW.state AND shard = pg_backend_pid();
    IF NOT FOUND THEN
        INSERT INTO event_counts (event_type, state, shard, n)
        VALUES (NEW.event_type, NEW.state, pg_backend_pid(), 1)
        ON CONFLICT (event_type, state, shard) DO UPDATE SET n = event_counts.n + 1;
    END IF;
    RETURN NULL;
END;
$$;
CREATE FUNCTION dinghook_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO event_counts (event_type, state, shard, n)
        SELECT event_type, state, pg_backend_pid(), -COUNT(*) FROM old_rows
        GROUP BY event_type, state
        ON CONFLICT (event_type, state, shard) DO UPDATE SET n = event_counts.n + EXCLUDED.n;
    ELSE
        INSERT INTO event_counts (event_type, state, shard, n)
        SELECT event_type, state, pg_backend_pid(), SUM(d) FROM (
            SELECT event_type, state, 1 AS d FROM new_rows
            UNION ALL
            SELECT event_type, state, -1 AS d FROM old_rows
        ) AS moved
        GROUP BY event_type, state HAVING SUM(d) <> 0
        ON CONFLICT (event_type, state, shard) DO UPDATE SET n = event_counts.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_count_insert AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION dinghook_count_insert();
CREATE TRIGGER events_count_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dinghook_count_changes();
CREATE TRIGGER events_count_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dinghook_count_changes();
"#;

/// What this version's count triggers, functions and table are, taken away: `then` puts back
/// those of an earlier migration.
fn without_counts(raw: &Raw) -> &'static str {
    match raw {
        Raw::Sqlite(_) => {
            "DROP TRIGGER events_count_insert; DROP TRIGGER events_count_update; \
             DROP TRIGGER events_count_delete; DROP TABLE event_counts; \
             DROP TABLE deliveries; DROP TABLE route_pauses;"
        }
        Raw::Postgres(_) => {
            "DROP TRIGGER events_count_insert ON events; \
             DROP TRIGGER events_count_update ON events; \
             DROP TRIGGER events_count_delete ON events; \
             DROP FUNCTION dinghook_count_insert(); DROP FUNCTION dinghook_count_changes(); \
             DROP TABLE event_counts; DROP TABLE deliveries; DROP TABLE route_pauses;"
        }
    }
}

/// The database as migration 10 left it: counts by type and state, not by app, kept by
/// migration 8's triggers (SQLite) or migration 10's (PostgreSQL).
async fn back_to_migration_10(raw: &Raw) {
    let drop = without_counts(raw);
    match raw {
        Raw::Sqlite(_) => {
            raw.execute(&format!(
                "{drop} {SQLITE_COUNTS_8} PRAGMA user_version = 10;"
            ))
            .await
        }
        Raw::Postgres(_) => {
            raw.execute(&format!(
                "{drop} {POSTGRES_COUNTS_8} {MIGRATION_10_TRIGGERS} \
                 DELETE FROM dinghook_migrations WHERE version > 10;"
            ))
            .await
        }
    }
}

/// Events of three apps written at migration 10 (counted by type and state only), counts
/// that went wrong there (an operator's edit, a row of a type with no events), then the
/// upgrade: migration 11 counts every app's events again from the table, and the new triggers
/// keep them by app from then on.
async fn an_upgrade_from_migration_10_recounts_by_app(store: Arc<dyn Store>, url: &str) {
    let raw = Raw::open(url).await;
    back_to_migration_10(&raw).await;
    for i in 0..60 {
        let t = ["a", "b", "c"][i % 3];
        let app = ["default", "ops", "crm"][i % 5 % 3];
        store
            .insert(app_event(app, &format!("v10-{i}"), t, T0 + i as i64))
            .await
            .unwrap();
    }
    let claimed = store.claim("w", 30, 60_000, T0 + 100).await.unwrap();
    for (n, e) in claimed.iter().enumerate() {
        match n % 4 {
            0 => assert!(store.mark_done(e.id, "w", T0 + 101).await.unwrap()),
            1 => assert!(store
                .mark_retry(e.id, "w", T0 + 500 + n as i64, "later", &[], T0 + 101)
                .await
                .unwrap()),
            2 => assert!(store
                .mark_dead(e.id, "w", "no", &[], T0 + 101)
                .await
                .unwrap()),
            _ => {} // still running
        }
    }
    assert_eq!(
        raw.counts_without_app().await,
        by_type_of(&raw.truth().await.counts, None),
        "counted by type and state at migration 10"
    );
    raw.execute(
        "UPDATE event_counts SET n = n + 1000 WHERE state = 'pending'; \
         INSERT INTO event_counts (event_type, state, shard, n) VALUES ('ghost', 'done', 0, 5);",
    )
    .await;
    // And a trigger gone (an operator's, or an interrupted scripts/counts-cost.sh): the
    // upgrade makes the counts whole again.
    match raw {
        Raw::Sqlite(_) => raw.execute("DROP TRIGGER events_count_delete").await,
        Raw::Postgres(_) => {
            raw.execute("DROP TRIGGER events_count_delete ON events")
                .await
        }
    }
    assert!(
        store.stats(T0).await.is_err(),
        "no counts by app before the upgrade"
    );
    store.close().await;

    let upgraded = open_url(url).await;
    assert_exact(&*upgraded, &raw, "the upgrade from migration 10").await;
    let stats = upgraded.stats(T0).await.unwrap();
    assert_eq!(stats.by_app.len(), 3, "{stats:?}");
    assert!(!stats.by_type.contains_key("ghost"), "{stats:?}");
    let more = upgraded.claim("w2", 100, 60_000, T0 + 1_000).await.unwrap();
    for e in more.iter().step_by(2) {
        upgraded.mark_done(e.id, "w2", T0 + 1_001).await.unwrap();
    }
    upgraded
        .insert(app_event("ops", "new-ops", "e", T0 + 2_000))
        .await
        .unwrap();
    upgraded
        .insert(app_event("billing", "new-billing", "e", T0 + 2_001))
        .await
        .unwrap();
    assert_exact(
        &*upgraded,
        &raw,
        "writes after the upgrade from migration 10",
    )
    .await;
    raw.execute("DELETE FROM events WHERE app = 'crm' OR state = 'done'")
        .await;
    assert_exact(
        &*upgraded,
        &raw,
        "deletes after the upgrade from migration 10",
    )
    .await;
    upgraded.close().await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(#[tokio::test] async fn $name() {
                let t = fresh(Backend::Sqlite).await.expect("sqlite is always available");
                super::$name(Arc::clone(&t.store), &t.url).await;
            })*
        }
        mod postgres {
            use super::*;
            $(#[tokio::test] async fn $name() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::$name(Arc::clone(&t.store), &t.url).await;
            })*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn replicas_writing_and_compacting_at_once_keep_exact_counts() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::replicas_writing_and_compacting_at_once_keep_exact_counts(&url).await;
            }
            #[tokio::test]
            async fn counts_kept_row_by_row_carry_over_to_statement_triggers() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::counts_kept_row_by_row_carry_over_to_statement_triggers(
                    Arc::clone(&t.store),
                    &t.url,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn an_upgrade_while_another_replica_writes_misses_nothing() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::an_upgrade_while_another_replica_writes_misses_nothing(
                    &url,
                    Migration::BeforeCounts,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn an_upgrade_to_counts_by_app_while_another_replica_writes_misses_nothing() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::an_upgrade_while_another_replica_writes_misses_nothing(
                    &url,
                    Migration::CountsWithoutApp,
                )
                .await;
            }
        }
    };
}

on_both_stores!(
    counts_stay_exact_through_every_write,
    statements_of_many_rows_are_counted_fast,
    an_older_database_gets_exact_counts_on_upgrade,
    an_upgrade_from_migration_10_recounts_by_app,
);

// --- PostgreSQL: several replicas -------------------------------------------------------------

/// One replica's worker: inserts events of three types and takes them through every outcome.
async fn busy_worker(store: Arc<PostgresStore>, name: String, rounds: usize) {
    for round in 0..rounds {
        for i in 0..4 {
            let t = ["a", "b", "c"][(round + i) % 3];
            store
                .insert(event(&format!("{name}-{round}-{i}"), t, T0 + round as i64))
                .await
                .unwrap();
        }
        let now = T0 + 10_000 + round as i64;
        let claimed = store.claim(&name, 5, 60_000, now).await.unwrap();
        for (n, e) in claimed.iter().enumerate() {
            let ok = match n % 5 {
                0 | 1 => store.mark_done(e.id, &name, now).await,
                2 => store.mark_retry(e.id, &name, now, "busy", &[], now).await,
                3 => store.mark_dead(e.id, &name, "no", &[], now).await,
                _ => store
                    .release(std::slice::from_ref(&name), now)
                    .await
                    .map(|n| n > 0),
            };
            ok.unwrap();
        }
        if round % 10 == 9 {
            store
                .replay(&ReplaySelector::State(EventState::Dead), now)
                .await
                .unwrap();
        }
    }
}

/// Three replicas (a pool each), four workers each, writing at once while one of them folds
/// the counter shards over and over: no write fails (no deadlock between sessions, the
/// compaction and the writers), and the counts match the table at the end.
async fn replicas_writing_and_compacting_at_once_keep_exact_counts(url: &str) {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Arc::new(PostgresStore::open(url).await.unwrap()));
    }
    let mut workers = Vec::new();
    for (r, store) in replicas.iter().enumerate() {
        for w in 0..4 {
            workers.push(tokio::spawn(busy_worker(
                Arc::clone(store),
                format!("r{r}w{w}"),
                40,
            )));
        }
    }
    // Two replicas compacting over and over, beside the writers and each other.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactors: Vec<_> = replicas[..2]
        .iter()
        .map(|store| {
            let (store, done) = (Arc::clone(store), Arc::clone(&done));
            tokio::spawn(async move {
                let (mut runs, mut folded) = (0, 0);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    folded += store.compact_counts().await.unwrap();
                    runs += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (runs, folded)
            })
        })
        .collect();
    let raw = Raw::open(url).await;
    for w in workers {
        w.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut runs, mut folded) = (0, 0);
    for c in compactors {
        let (r, f) = c.await.unwrap();
        (runs, folded) = (runs + r, folded + f);
    }
    eprintln!("{runs} compactions beside the writers took out {folded} session rows");
    assert!(folded > 0, "the writers wrote rows of their own sessions");
    let Raw::Postgres(client) = &raw else {
        unreachable!()
    };
    assert_exact(&*replicas[1], &raw, "three replicas at once").await;
    replicas[2].compact_counts().await.unwrap();
    assert_exact(&*replicas[1], &raw, "the last compaction").await;
    let left: Vec<(i32, i64)> = client
        .query("SELECT shard, n FROM event_counts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        left.iter().all(|&(shard, n)| shard == 0 && n != 0),
        "one row per (type, state) left, none zero: {left:?}"
    );
}

/// The schema a rolling upgrade starts from.
#[derive(Debug, Clone, Copy)]
enum Migration {
    /// Migration 7: no counts (migration 8 adds them).
    BeforeCounts,
    /// Migration 10: counts by type and state (migration 11 adds the app).
    CountsWithoutApp,
}

/// A rolling upgrade: one replica of the version before keeps inserting while another opens
/// the database and runs migration 8 (or 11). Its inserts wait for the migration's lock, so
/// each is counted exactly once: in the migration's count or by the trigger.
async fn an_upgrade_while_another_replica_writes_misses_nothing(url: &str, from: Migration) {
    let old = open_url(url).await;
    let raw = Raw::open(url).await;
    match from {
        Migration::BeforeCounts => back_to_migration_7(&raw).await,
        Migration::CountsWithoutApp => back_to_migration_10(&raw).await,
    }
    for i in 0..2_000 {
        let app = ["default", "ops"][i as usize % 2];
        old.insert(app_event(app, &format!("pre{i}"), "a", T0 + i))
            .await
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (old, stop) = (Arc::clone(&old), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let app = ["default", "ops"][n as usize % 2];
                old.insert(app_event(app, &format!("during{n}"), "b", T0 + n))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let upgraded = open_url(url).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = writer.await.unwrap();
    eprintln!("{during} events inserted by the old replica around the upgrade");
    assert!(during > 0);
    assert_exact(&*upgraded, &raw, "an upgrade under writes").await;
}

/// Migration 8's triggers, as it made them (frozen here: the database of a version before 10,
/// which also had 8's index `events_waiting_since`).
const MIGRATION_8_TRIGGERS: &str = r#"
CREATE FUNCTION dinghook_count_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO event_counts (event_type, state, shard, n)
        VALUES (OLD.event_type, OLD.state, pg_backend_pid(), -1)
        ON CONFLICT (event_type, state, shard) DO UPDATE SET n = event_counts.n - 1;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO event_counts (event_type, state, shard, n)
        VALUES (NEW.event_type, NEW.state, pg_backend_pid(), 1)
        ON CONFLICT (event_type, state, shard) DO UPDATE SET n = event_counts.n + 1;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_count_insert AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION dinghook_count_event();
CREATE TRIGGER events_count_update AFTER UPDATE OF state, event_type ON events
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.event_type IS DISTINCT FROM NEW.event_type)
    EXECUTE FUNCTION dinghook_count_event();
CREATE TRIGGER events_count_delete AFTER DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION dinghook_count_event();
"#;

/// A database at migration 9, its counts kept by migration 8's row triggers, opened by this
/// version: migration 10 swaps the triggers, migration 11 counts again by app, the counts
/// are exact, and a replay of thousands of events is then one counter update per app, type
/// and state.
async fn counts_kept_row_by_row_carry_over_to_statement_triggers(store: Arc<dyn Store>, url: &str) {
    let raw = Raw::open(url).await;
    raw.execute(&format!(
        "{} {POSTGRES_COUNTS_8} {MIGRATION_8_TRIGGERS} \
         CREATE INDEX events_waiting_since ON events (received_at) \
             WHERE state IN ('pending', 'retry'); \
         DELETE FROM dinghook_migrations WHERE version >= 10;",
        without_counts(&raw)
    ))
    .await;
    for i in 0..300 {
        let t = ["a", "b", "c"][i % 3];
        store
            .insert(event(&format!("row{i}"), t, T0 + i as i64))
            .await
            .unwrap();
    }
    let claimed = store.claim("w", 100, 60_000, T0 + 500).await.unwrap();
    for (n, e) in claimed.iter().enumerate() {
        if n % 2 == 0 {
            store.mark_done(e.id, "w", T0 + 501).await.unwrap();
        } else {
            store
                .mark_dead(e.id, "w", "no", &[], T0 + 501)
                .await
                .unwrap();
        }
    }
    raw.execute("DELETE FROM events WHERE state = 'done' AND event_type = 'a'")
        .await;
    assert_eq!(
        raw.counts_without_app().await,
        by_type_of(&raw.truth().await.counts, None),
        "counting row by row (migration 8)"
    );
    store.close().await;

    let upgraded = open_url(url).await;
    assert_exact(&*upgraded, &raw, "migration 10").await;
    let Raw::Postgres(client) = &raw else {
        unreachable!()
    };
    let update: String = client
        .query_one(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'events_count_update'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(update.contains("FOR EACH STATEMENT"), "{update}");
    for batch in 0..5 {
        raw.execute(&format!(
            "INSERT INTO events (dedup_key, event_type, payload, received_at, state, \
                 next_attempt_at, updated_at) \
             SELECT 'bulk:' || i, 'b', '{{}}', {T0} + i, 'dead', {T0}, {T0} \
             FROM generate_series({}, {}) AS i",
            batch * 1_000,
            batch * 1_000 + 999
        ))
        .await;
    }
    let started = Instant::now();
    let n = upgraded
        .replay(&ReplaySelector::State(EventState::Dead), T0 + 1_000)
        .await
        .unwrap();
    assert_eq!(n, 5_050);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_exact(&*upgraded, &raw, "a replay of 5 050 after migration 10").await;
    upgraded.close().await;
}
