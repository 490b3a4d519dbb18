//! What `stats` (the `/metrics` queue figures) and `insert` cost on a real store, for
//! `docs/benchmarks.md`. Run it in release mode on a store made for it:
//!
//!   # fill with N events (raw SQL, the count triggers keep up), then time 50 `stats` calls;
//!   # --before also times the statements `stats` ran before migration 8, on the same data;
//!   # --apps N spreads the events over N apps
//!   cargo run --release --example store_bench -- scrape --url sqlite:///tmp/b.db \
//!       --events 1000000 --before
//!   # distinct events through `Store::insert`, 64 at a time, in rounds alternating the
//!   # schema with the counts (triggers) and without them (as before migration 8)
//!   cargo run --release --example store_bench -- insert --url postgres://…/bench \
//!       --events 20000 --replicas 2 --compare-without-counts
//!
//!   # the same with the dispatcher's side, with and without the run history (migration 15)
//!   cargo run --release --example store_bench -- insert --url sqlite:///tmp/r.db \
//!       --events 20000 --rounds 5 --compare-without-runs --drain
//!
//!   # a store of N events over 30 days pruned to 7 days, inserts at a steady rate beside it
//!   cargo run --release --example store_bench -- prune --url sqlite:///tmp/p.db \
//!       --events 1000000 --rate 1000
//!
//! The database must be empty (a new SQLite path, a new PostgreSQL database).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dinghook::store::{NewEvent, Source, Store, StoreConfig};
use dinghook::time::now_millis;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fill the store, then time `stats`.
    Scrape {
        #[arg(long)]
        url: String,
        /// Events to write before timing.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// `stats` calls to time.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Also time the statements of the version before migration 8 (table scans).
        #[arg(long)]
        before: bool,
        /// Apps the events are spread over (`app_0` …; 1: all the `default` app's): `stats`
        /// reads each app's oldest waiting event.
        #[arg(long, default_value_t = 1)]
        apps: u64,
    },
    /// Fill the store (events over 30 days, ~97 % done), then prune it as `[retention]`
    /// would (done after 7 days), timing inserts at a steady rate meanwhile and, for
    /// comparison, the same inserts without the prune.
    Prune {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// `retention.batch`.
        #[arg(long, default_value_t = 200)]
        batch: u32,
        /// Inserts a second beside the prune (in 16 concurrent streams).
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
    },
    /// Time distinct inserts through the store API.
    Insert {
        #[arg(long)]
        url: String,
        /// Events per round.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Inserts in flight at once, over all replicas.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Stores opened on the URL (PostgreSQL: a pool each, as replicas).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Event types the inserts spread over (1: a storm of one type, the worst case for
        /// the counter rows).
        #[arg(long, default_value_t = 1)]
        types: u64,
        /// Rounds per schema.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Alternate rounds with and without the counts (the triggers dropped, then put
        /// back: what an insert cost before migration 8).
        #[arg(long)]
        compare_without_counts: bool,
        /// PostgreSQL: also run rounds with every session adding to one counter row per
        /// (type, state) instead of its own shard.
        #[arg(long)]
        compare_one_shard: bool,
        /// Alternate rounds with and without migration 15's run history (its trigger dropped,
        /// then put back); with `--drain`, what recording each run costs the dispatcher.
        #[arg(long)]
        compare_without_runs: bool,
        /// After each round, time the dispatcher's side too: workers claiming the round's
        /// events 64 at a time and marking each done.
        #[arg(long)]
        drain: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Scrape {
            url,
            events,
            runs,
            before,
            apps,
        } => scrape(&url, events, runs, before, apps).await,
        Command::Prune {
            url,
            events,
            batch,
            rate,
        } => prune(&url, events, batch, rate).await,
        Command::Insert {
            url,
            events,
            concurrency,
            replicas,
            types,
            rounds,
            compare_without_counts,
            compare_one_shard,
            compare_without_runs,
            drain,
        } => {
            let mut schemas = vec![Schema::Counts];
            if compare_without_counts {
                schemas.push(Schema::NoCounts);
            }
            if compare_one_shard {
                schemas.push(Schema::OneShard);
            }
            if compare_without_runs {
                schemas.push(Schema::NoRuns);
            }
            let shape = Shape {
                events,
                concurrency,
                replicas,
                types,
                rounds,
                drain,
            };
            insert(&url, &shape, &schemas).await
        }
    }
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    let config = StoreConfig {
        url: url.to_owned(),
        ..Default::default()
    };
    Ok(dinghook::store::open(&config).await?)
}

/// A plain connection beside the store.
enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Raw {
    async fn open(url: &str) -> anyhow::Result<Raw> {
        Ok(match url.strip_prefix("sqlite://") {
            Some(path) => {
                let conn = rusqlite::Connection::open(path)?;
                conn.busy_timeout(Duration::from_secs(60))?;
                Raw::Sqlite(conn)
            }
            None => {
                let (client, connection) =
                    tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Raw::Postgres(client)
            }
        })
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        match self {
            Raw::Sqlite(conn) => conn.execute_batch(sql)?,
            Raw::Postgres(client) => client.batch_execute(sql).await?,
        }
        Ok(())
    }

    /// Runs `sql` (a query) and returns how many rows it gave.
    async fn query(&self, sql: &str) -> anyhow::Result<usize> {
        Ok(match self {
            Raw::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                let mut rows = stmt.query([])?;
                let mut n = 0;
                while rows.next()?.is_some() {
                    n += 1;
                }
                n
            }
            Raw::Postgres(client) => client.query(sql, &[]).await?.len(),
        })
    }
}

/// About 300 bytes of JSON per event, as small DingTalk events are.
const PAD: &str =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghij\
klmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRS\
TUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz";

/// Writes `events` events, a million per statement: 8 types, spread over `apps` apps; 0.5 %
/// pending, 0.5 % retry, 2 % dead, 0.1 % running, the rest done. Received over the last 30
/// days. SQLite counts them
/// with its triggers; PostgreSQL's insert trigger counts one row at a time, which inside one
/// statement of a million rows costs N² (see migration 10), so there the triggers are off for
/// the fill and the counts are computed afterwards, as the migration does.
async fn fill(raw: &Raw, events: u64, apps: u64) -> anyhow::Result<()> {
    if let Raw::Postgres(_) = raw {
        raw.execute("SET session_replication_role = replica")
            .await?;
    }
    let now = now_millis();
    let start = now - 30 * 86_400_000;
    let step = (30 * 86_400_000 / events.max(1)).max(1);
    let chunk = 1_000_000;
    let mut from = 0;
    while from < events {
        let to = (from + chunk).min(events);
        let started = Instant::now();
        let state = "CASE WHEN i % 1000 < 5 THEN 'pending' WHEN i % 1000 < 10 THEN 'retry' \
                     WHEN i % 1000 < 30 THEN 'dead' WHEN i % 1000 = 30 THEN 'running' \
                     ELSE 'done' END";
        let columns = "dedup_key, event_type, corp_id, payload, source, received_at, state, \
                       attempts, next_attempt_at, updated_at, app";
        // By blocks of 1 000, so every app has waiting events (every block has 10).
        let app = match apps {
            0 | 1 => "'default'".to_owned(),
            n => format!("'app_' || ((i / 1000) % {n})"),
        };
        let sql = match raw {
            Raw::Sqlite(_) => format!(
                "BEGIN; WITH RECURSIVE s(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM s \
                 WHERE i + 1 < {to}) INSERT INTO events ({columns}) \
                 SELECT 'bench:' || i, 'type_' || (i % 8), 'dingcorp', \
                 '{{\"EventType\":\"type_' || (i % 8) || '\",\"eventId\":\"' || i || \
                 '\",\"pad\":\"{PAD}\"}}', 'push', {start} + i * {step}, {state}, 1, \
                 {start} + i * {step}, {start} + i * {step}, {app} FROM s; COMMIT;"
            ),
            Raw::Postgres(_) => format!(
                "INSERT INTO events ({columns}) \
                 SELECT 'bench:' || i, 'type_' || (i % 8), 'dingcorp', \
                 '{{\"EventType\":\"type_' || (i % 8) || '\",\"eventId\":\"' || i || \
                 '\",\"pad\":\"{PAD}\"}}', 'push', {start} + i * {step}, {state}, 1, \
                 {start} + i * {step}, {start} + i * {step}, {app} \
                 FROM generate_series({from}::bigint, {to}::bigint - 1) AS i"
            ),
        };
        raw.execute(&sql).await?;
        eprintln!(
            "  wrote {to} events ({:.1?} for the last chunk)",
            started.elapsed()
        );
        from = to;
    }
    if let Raw::Postgres(_) = raw {
        raw.execute(
            "SET session_replication_role = origin; \
             BEGIN; LOCK TABLE events; DELETE FROM event_counts; \
             INSERT INTO event_counts (app, event_type, state, shard, n) \
             SELECT app, event_type, state, 0, COUNT(*) FROM events \
             GROUP BY app, event_type, state; \
             COMMIT",
        )
        .await?;
        raw.execute("VACUUM ANALYZE events").await?;
        raw.execute("VACUUM ANALYZE event_counts").await?;
    }
    Ok(())
}

struct Timings(Vec<Duration>);

impl Timings {
    fn at(&self, q: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }
    fn show(&self) -> String {
        format!(
            "median {:.3?}, p99 {:.3?}, max {:.3?} ({} runs)",
            self.at(0.5),
            self.at(0.99),
            self.at(1.0),
            self.0.len()
        )
    }
}

async fn scrape(
    url: &str,
    events: u64,
    runs: usize,
    before: bool,
    apps: u64,
) -> anyhow::Result<()> {
    let store = open(url).await?;
    let raw = Raw::open(url).await?;
    eprintln!("filling {url} with {events} events");
    let started = Instant::now();
    fill(&raw, events, apps).await?;
    eprintln!("filled in {:.1?}", started.elapsed());

    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(store.stats(now_millis()).await?);
        times.push(started.elapsed());
    }
    let stats = last.unwrap_or_default();
    let total: u64 = stats.by_state.values().sum();
    anyhow::ensure!(total == events, "stats counted {total} of {events} events");
    let by_app = stats.by_app.len() as u64;
    anyhow::ensure!(
        by_app == apps.max(1),
        "stats showed {by_app} of {apps} apps"
    );
    println!(
        "{url} {events} events, {by_app} apps: stats (maintained counts) {}",
        Timings(times).show()
    );

    if before {
        // The statements `stats` ran before migration 8.
        let mut times = Vec::new();
        for _ in 0..runs.min(5) {
            let started = Instant::now();
            raw.query("SELECT event_type, state, COUNT(*) FROM events GROUP BY event_type, state")
                .await?;
            raw.query("SELECT MIN(received_at) FROM events WHERE state IN ('pending', 'retry')")
                .await?;
            times.push(started.elapsed());
        }
        println!(
            "{url} {events} events: stats before (table scans) {}",
            Timings(times).show()
        );
    }
    store.close().await;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    /// Migrations 8, 10 and 11 as they are.
    Counts,
    /// The count triggers dropped: what an insert cost before migration 8.
    NoCounts,
    /// PostgreSQL: every session adds to shard 0, one hot row per (type, state).
    OneShard,
    /// Migration 15's trigger dropped: runs end without a row in `event_runs`.
    NoRuns,
}

const SQLITE_TRIGGERS: &str = "events_count_insert, events_count_update, events_count_delete";

/// Puts the database in `schema`. The triggers' and function's text is read back from the
/// database, so what is measured is what migrations 8, 10 and 11 made.
async fn set_schema(raw: &Raw, schema: Schema, saved: &mut Vec<String>) -> anyhow::Result<()> {
    // Back to the schema as it is first.
    for sql in saved.drain(..) {
        raw.execute(&sql).await?;
    }
    match (raw, schema) {
        (_, Schema::Counts) => {}
        (Raw::Sqlite(conn), Schema::NoCounts) => {
            for name in SQLITE_TRIGGERS.split(", ") {
                let sql: String = conn.query_row(
                    "SELECT sql FROM sqlite_master WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )?;
                saved.push(format!("{sql};"));
                raw.execute(&format!("DROP TRIGGER {name}")).await?;
            }
        }
        (Raw::Postgres(client), Schema::NoCounts) => {
            for (name, def) in [
                ("events_count_insert", "pg_get_triggerdef(oid)"),
                ("events_count_update", "pg_get_triggerdef(oid)"),
                ("events_count_delete", "pg_get_triggerdef(oid)"),
            ] {
                let sql: String = client
                    .query_one(
                        &format!("SELECT {def} FROM pg_trigger WHERE tgname = $1"),
                        &[&name],
                    )
                    .await?
                    .get(0);
                saved.push(sql);
                raw.execute(&format!("DROP TRIGGER {name} ON events"))
                    .await?;
            }
        }
        (Raw::Postgres(client), Schema::OneShard) => {
            let sql: String = client
                .query_one(
                    "SELECT pg_get_functiondef('dinghook_count_insert'::regproc)",
                    &[],
                )
                .await?
                .get(0);
            anyhow::ensure!(sql.contains("pg_backend_pid()"), "unexpected trigger");
            saved.push(sql.clone());
            raw.execute(&sql.replace("pg_backend_pid()", "0")).await?;
        }
        (Raw::Sqlite(_), Schema::OneShard) => anyhow::bail!("SQLite has one shard anyway"),
        (Raw::Sqlite(conn), Schema::NoRuns) => {
            let sql: String = conn.query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'events_run_ended'",
                [],
                |r| r.get(0),
            )?;
            saved.push(format!("{sql};"));
            raw.execute("DROP TRIGGER events_run_ended").await?;
        }
        (Raw::Postgres(client), Schema::NoRuns) => {
            let sql: String = client
                .query_one(
                    "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'events_run_ended'",
                    &[],
                )
                .await?
                .get(0);
            saved.push(sql);
            raw.execute("DROP TRIGGER events_run_ended ON events")
                .await?;
        }
    }
    Ok(())
}

/// What `insert` runs.
struct Shape {
    events: u64,
    concurrency: usize,
    replicas: usize,
    types: u64,
    rounds: usize,
    drain: bool,
}

async fn insert(url: &str, shape: &Shape, schemas: &[Schema]) -> anyhow::Result<()> {
    let Shape {
        events,
        concurrency,
        replicas,
        types,
        rounds,
        drain,
    } = *shape;
    let mut stores = Vec::new();
    for _ in 0..replicas.max(1) {
        stores.push(open(url).await?);
    }
    let raw = Raw::open(url).await?;
    let mut saved = Vec::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut results: Vec<(Schema, f64, Timings)> = Vec::new();
    let mut drains: Vec<(Schema, f64)> = Vec::new();
    // A warm-up round, not counted.
    run_inserts(&stores, &next, events / 4, concurrency, types).await?;
    if drain {
        run_drain(&stores, concurrency).await?;
    }
    for round in 0..rounds {
        for &schema in schemas {
            set_schema(&raw, schema, &mut saved).await?;
            let started = Instant::now();
            let latencies = run_inserts(&stores, &next, events, concurrency, types).await?;
            let rate = events as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "round {round} {schema:?}: {rate:.0}/s, {}",
                Timings(latencies.clone()).show()
            );
            results.push((schema, rate, Timings(latencies)));
            if drain {
                let started = Instant::now();
                let drained = run_drain(&stores, concurrency).await?;
                let rate = drained as f64 / started.elapsed().as_secs_f64();
                eprintln!("round {round} {schema:?}: drained {drained} at {rate:.0}/s");
                drains.push((schema, rate));
            }
        }
    }
    set_schema(&raw, Schema::Counts, &mut saved).await?;
    for &schema in schemas {
        let mine: Vec<_> = results.iter().filter(|(s, ..)| *s == schema).collect();
        let mut rates: Vec<f64> = mine.iter().map(|(_, r, _)| *r).collect();
        rates.sort_by(f64::total_cmp);
        let all = Timings(mine.iter().flat_map(|(.., t)| t.0.clone()).collect());
        println!(
            "{url} insert, {replicas} replica(s) x {} in flight, {types} type(s), {schema:?}: \
             {:.0}/s median of {} rounds (min {:.0}, max {:.0}); latency p50 {:.2?} p99 {:.2?}",
            concurrency / replicas.max(1),
            rates[rates.len() / 2],
            rates.len(),
            rates[0],
            rates[rates.len() - 1],
            all.at(0.5),
            all.at(0.99),
        );
    }
    for &schema in schemas {
        let mut rates: Vec<f64> = drains
            .iter()
            .filter(|(s, _)| *s == schema)
            .map(|(_, r)| *r)
            .collect();
        if rates.is_empty() {
            continue;
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "{url} claim 64 + done each, {} workers, {schema:?}: {:.0}/s median of {} rounds \
             (min {:.0}, max {:.0})",
            (concurrency / 8).max(1),
            rates[rates.len() / 2],
            rates.len(),
            rates[0],
            rates[rates.len() - 1],
        );
    }
    for store in stores {
        store.close().await;
    }
    Ok(())
}

/// Claims every due event, 64 at a time, with `concurrency / 8` workers over the stores, and
/// marks each done. Returns how many.
async fn run_drain(stores: &[Arc<dyn Store>], concurrency: usize) -> anyhow::Result<u64> {
    let mut tasks = Vec::new();
    for worker in 0..(concurrency / 8).max(1) {
        let store = Arc::clone(&stores[worker % stores.len()]);
        tasks.push(tokio::spawn(async move {
            let owner = format!("bench-{worker}");
            let mut done = 0;
            loop {
                let now = now_millis();
                let claimed = store.claim(&owner, 64, 60_000, now).await?;
                if claimed.is_empty() {
                    break;
                }
                for event in &claimed {
                    store.mark_done(event.id, &owner, now).await?;
                }
                done += claimed.len() as u64;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}

/// `events` distinct inserts, `concurrency` at a time spread over `stores`; their latencies.
async fn run_inserts(
    stores: &[Arc<dyn Store>],
    next: &Arc<AtomicU64>,
    events: u64,
    concurrency: usize,
    types: u64,
) -> anyhow::Result<Vec<Duration>> {
    let end = next.load(Ordering::Relaxed) + events;
    let mut tasks = Vec::new();
    for worker in 0..concurrency.max(1) {
        let store = Arc::clone(&stores[worker % stores.len()]);
        let next = Arc::clone(next);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let event_type = format!("type_{}", i % types.max(1));
                let event = NewEvent {
                    app: "default".into(),
                    dedup_key: format!("insert:{i}"),
                    payload: format!(
                        r#"{{"EventType":"{event_type}","eventId":"{i}","pad":"{PAD}"}}"#
                    ),
                    event_type,
                    corp_id: Some("dingcorp".into()),
                    source: Source::Push,
                    received_at: now_millis(),
                    routes: Vec::new(),
                };
                let started = Instant::now();
                store.insert(event).await?;
                latencies.push(started.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    // Workers stopped at `end`; the counter ran past it by one per worker.
    next.store(end, Ordering::Relaxed);
    Ok(all)
}

/// Inserts at `rate` a second for `seconds` (16 streams), each stream waiting for its own
/// before the next; returns their latencies.
async fn steady_inserts(
    store: &Arc<dyn Store>,
    prefix: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Vec<Duration>> {
    const STREAMS: u64 = 16;
    let mut tasks = Vec::new();
    for stream in 0..STREAMS {
        let store = Arc::clone(store);
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_secs_f64(STREAMS as f64 / rate.max(1) as f64);
            let mut tick = tokio::time::interval(every);
            let mut latencies = Vec::new();
            for i in 0..(rate * seconds / STREAMS) {
                tick.tick().await;
                let event = NewEvent {
                    app: "default".into(),
                    dedup_key: format!("{prefix}:{stream}:{i}"),
                    payload: format!(r#"{{"EventType":"type_0","eventId":"{i}","pad":"{PAD}"}}"#),
                    event_type: "type_0".into(),
                    corp_id: Some("dingcorp".into()),
                    source: Source::Push,
                    received_at: now_millis(),
                    routes: Vec::new(),
                };
                let started = Instant::now();
                store.insert(event).await?;
                latencies.push(started.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

async fn prune(url: &str, events: u64, batch: u32, rate: u64) -> anyhow::Result<()> {
    use dinghook::retention::{AppRetention, Retention, RetentionConfig};
    let store = open(url).await?;
    let raw = Raw::open(url).await?;
    eprintln!("filling {events} events over 30 days");
    fill(&raw, events, 1).await?;
    let before = raw.query("SELECT id FROM events").await?;
    let retention = Arc::new(Retention::new(
        Arc::clone(&store),
        Arc::new(dinghook::metrics::Metrics::new()),
        RetentionConfig {
            batch,
            ..RetentionConfig::default()
        },
        vec![AppRetention {
            app: "default".into(),
            done: Duration::from_secs(7 * 86_400),
            dead: Duration::from_secs(30 * 86_400),
        }],
    ));
    // Inserts alone, for comparison.
    let alone = Timings(steady_inserts(&store, "alone", rate, 10).await?);
    eprintln!("inserts alone at {rate}/s: {}", alone.show());
    let started = Instant::now();
    let pruner = {
        let retention = Arc::clone(&retention);
        tokio::spawn(async move { retention.prune(now_millis(), &|| false).await })
    };
    let inserting = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut all = Vec::new();
            // In rounds of 5 s until the prune ends.
            for round in 0.. {
                all.extend(steady_inserts(&store, &format!("beside-{round}"), rate, 5).await?);
                if round > 1_000 {
                    break;
                }
                if PRUNE_DONE.load(Ordering::Relaxed) {
                    break;
                }
            }
            anyhow::Ok(all)
        })
    };
    let pruned = pruner.await??;
    let took = started.elapsed();
    PRUNE_DONE.store(true, Ordering::Relaxed);
    let beside = Timings(inserting.await??);
    let after = raw.query("SELECT id FROM events").await?;
    println!(
        "{url}: {events} events, prune to 7 days in batches of {batch}: {} done + {} dead \
         deleted in {took:.1?} ({:.0} events/s); rows {before} -> {after} (with the inserts)",
        pruned.done,
        pruned.dead,
        (pruned.done + pruned.dead) as f64 / took.as_secs_f64(),
    );
    println!("  inserts at {rate}/s alone:       {}", alone.show());
    println!("  inserts at {rate}/s beside it:   {}", beside.show());
    store.close().await;
    Ok(())
}

static PRUNE_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
