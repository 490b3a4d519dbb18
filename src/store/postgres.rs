//! The PostgreSQL store, for several replicas sharing one inbox.
//!
//! Every operation is one autocommit statement on a pooled connection (migrations excepted).
//! tokio-postgres only finishes a query when the server sends `ReadyForQuery`, which comes
//! after the implicit transaction has committed, so an `Ok` means committed; the session
//! forces `synchronous_commit = on` so committed also means flushed to the server's WAL.
//!
//! Concurrency between replicas is the database's job: claims lock their rows with
//! `FOR UPDATE SKIP LOCKED`, de-duplication is the `UNIQUE (dedup_key)` constraint with
//! `ON CONFLICT DO NOTHING`, and migrations run under a transaction-scoped advisory lock.
//!
//! Nothing may hang when the server is down or stuck: connecting, waiting for a pooled
//! connection and every operation as a whole are bounded, and the server itself cancels
//! statements that run too long. A connection whose operation timed out is thrown away rather
//! than handed to the next caller, since its state (and the network path) is unknown.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::{NoTls, Row};

use super::deliveries::{delivery_from_row, DeliveryStatements};
use super::redact_url;
use super::rekey;
use super::schema::{self, Dialect, Statements};
use super::{
    DeliveryOutcome, DeliveryQuery, DeliveryReplay, RouteBacklog, RoutePause, StoredDelivery,
};
use super::{
    Document, EventRun, InsertHealth, Inserted, ListQuery, NewEvent, PruneEvents, ReplaySelector,
    Stats, Store, StoreError, StoredEvent,
};
use crate::time::now_millis;

/// The advisory lock that serialises migrations across replicas ("dinghook" in ASCII). Other
/// advisory locks (the recovery poller's election) must use different keys.
const MIGRATION_LOCK: i64 = 0x6469_6e67_686f_6f6b;

/// Bounds for a PostgreSQL store. The defaults keep every failure well inside the callback's
/// 10 s request time-out, so a dead database is a 503 rather than a hung request.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections in the pool (per replica).
    pub pool_size: usize,
    /// Opening one TCP connection and logging in (used unless the URL sets `connect_timeout`).
    pub connect_timeout: Duration,
    /// Waiting for a free pooled connection when all are busy.
    pub pool_wait_timeout: Duration,
    /// One whole store operation, including getting a connection. Past it the caller gets
    /// [`StoreError::Timeout`] and the connection is discarded.
    pub operation_timeout: Duration,
    /// The server cancels any one statement that runs longer (`statement_timeout`); shorter
    /// than `operation_timeout` so a slow server answers with its own error first.
    pub statement_timeout: Duration,
    /// Start-up migrations, which may build indexes on a large table and wait for another
    /// replica's migration.
    pub migration_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(3),
            pool_wait_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(4),
            migration_timeout: Duration::from_secs(60),
        }
    }
}

pub struct PostgresStore {
    pool: Pool,
    /// One connection for `stats`, apart from `pool`: a scrape never waits for a connection
    /// the handlers hold, and scrapes (however many) never take one from them.
    stats_pool: Pool,
    /// When `stats` last folded the counter shards (epoch ms; see
    /// [`PostgresStore::compact_counts`]).
    compacted_at: AtomicI64,
    options: PostgresOptions,
    sql: Sql,
    /// Failed event inserts, which `/readyz` also asks: the probe writes another table, which
    /// can take a row while `events` refuses them.
    inserts: InsertHealth,
}

/// How often `stats` folds the counter shards back into one row per (app, type, state).
const COMPACT_EVERY_MS: i64 = 60_000;

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => StoreError::Postgres(e),
            PoolError::Closed => StoreError::Closed,
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl PostgresStore {
    /// Connects with the default bounds, migrates and returns the store.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PostgresOptions::default()).await
    }

    /// Connects, migrates (under an advisory lock, so replicas starting together take turns)
    /// and returns the store. Fails, rather than waits, if the server cannot be reached.
    pub async fn open_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: redact_url(url),
            message,
        };
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(e.to_string()))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(options.connect_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("dinghook");
        }
        // Session settings sent at login, appended to any the URL already has.
        // synchronous_commit: an acknowledged event must be on the server's disk, whatever
        // the server's default. idle_in_transaction: a replica that dies inside a migration
        // must not hold the advisory lock for ever.
        let ms = |d: Duration| d.as_millis().max(1);
        let session = format!(
            "-c synchronous_commit=on -c statement_timeout={} -c lock_timeout={} \
             -c idle_in_transaction_session_timeout={}",
            ms(options.statement_timeout),
            ms(options.statement_timeout),
            ms(options.migration_timeout),
        );
        let session = match pg.get_options() {
            Some(existing) if !existing.trim().is_empty() => format!("{existing} {session}"),
            _ => session,
        };
        pg.options(session);
        // Finds connections to a vanished server without waiting for the next query.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));

        let pool_of = |pg: tokio_postgres::Config, size: usize| {
            let manager = Manager::from_config(
                pg,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(options.pool_wait_timeout))
                .create_timeout(Some(options.connect_timeout))
                .recycle_timeout(Some(options.connect_timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| open_err(e.to_string()))
        };
        let mut stats_pg = pg.clone();
        if stats_pg.get_application_name() == Some("dinghook") {
            stats_pg.application_name("dinghook-stats");
        }
        let stats_pool = pool_of(stats_pg, 1)?;
        let pool = pool_of(pg, options.pool_size.max(1))?;
        let store = PostgresStore {
            pool,
            stats_pool,
            compacted_at: AtomicI64::new(0),
            options,
            sql: Sql::new(),
            inserts: InsertHealth::default(),
        };
        // Connect first, so "cannot reach the server" is not reported as a failed migration.
        // The connection goes back to the pool for the migration to use.
        let limit = store.options.connect_timeout + store.options.pool_wait_timeout;
        match tokio::time::timeout(limit, store.pool.get()).await {
            Ok(Ok(_client)) => {}
            Ok(Err(e)) => return Err(open_err(StoreError::from(e).to_string())),
            Err(_) => return Err(open_err(StoreError::Timeout(limit).to_string())),
        }
        store
            .migrate()
            .await
            .map_err(|e| open_err(format!("migration failed: {e}")))?;
        Ok(store)
    }

    /// Applies the schema migrations not yet run, in order, in one transaction;
    /// `dinghook_migrations` records which ran.
    async fn migrate(&self) -> Result<(), StoreError> {
        let limit = self.options.migration_timeout + self.options.connect_timeout;
        let work = async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // Longer limits for this transaction only: building an index on a big table, or
            // waiting for another replica's migration, may take more than a query should.
            let ms = self.options.migration_timeout.as_millis().max(1);
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
            ))
            .await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS dinghook_migrations (\
                     version    INTEGER PRIMARY KEY, \
                     applied_at BIGINT  NOT NULL)",
            )
            .await?;
            let done: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM dinghook_migrations",
                    &[],
                )
                .await?
                .try_get(0)?;
            let done = usize::try_from(done).unwrap_or(0);
            let migrations = Dialect::Postgres.migrations();
            if done > migrations.len() {
                tracing::warn!(
                    schema_version = done,
                    known = migrations.len(),
                    "the database schema is newer than this binary"
                );
            }
            for (i, sql) in migrations.enumerate().skip(done) {
                tx.batch_execute(&sql).await?;
                if i + 1 == rekey::MIGRATION {
                    rekey_events(&tx).await?;
                }
                let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.execute(
                    "INSERT INTO dinghook_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&version, &now_millis()],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    /// Runs `op` on a pooled connection, the whole of it (getting the connection included)
    /// bounded by `operation_timeout`.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&Object) -> Result<T, StoreError>,
    {
        self.run_on(&self.pool, op).await
    }

    /// [`PostgresStore::run`] on a connection of `pool`.
    async fn run_on<T, F>(&self, pool: &Pool, op: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&Object) -> Result<T, StoreError>,
    {
        run_bounded(pool, self.options.operation_timeout, op).await
    }

    /// Folds the shards of the maintained counts (migrations 8 and 11) into shard 0 and drops
    /// rows that count nothing, so `stats` reads about one row per (app, type, state) it
    /// reports. Sums are unchanged: each statement moves counts inside its own transaction.
    /// Rows a writer holds are skipped, not waited for. `stats` runs this in the background
    /// at most once a minute (per replica). Returns how many rows it took out.
    pub async fn compact_counts(&self) -> Result<u64, StoreError> {
        compact_counts(&self.stats_pool, self.options.operation_timeout).await
    }

    async fn query(
        client: &Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let stmt = client.prepare_cached(sql).await?;
        Ok(client.query(&stmt, params).await?)
    }

    async fn query_opt(
        client: &Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let stmt = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&stmt, params).await?)
    }

    async fn execute(
        client: &Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let stmt = client.prepare_cached(sql).await?;
        Ok(client.execute(&stmt, params).await?)
    }
}

/// Migration 6's data step (see `rekey`): re-keys the events whose key changed, and the
/// documents that name them, inside the migration's transaction. Each table takes one
/// statement over arrays, so many re-keyed rows cost no round trip each.
async fn rekey_events(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    let mut renames = rekey::Renames::default();
    for row in tx.query(rekey::candidates(Dialect::Postgres), &[]).await? {
        let payload: String = row.try_get(2)?;
        renames.consider(row.try_get(0)?, row.try_get(1)?, &payload);
    }
    if renames.is_empty() {
        return Ok(());
    }
    let (ids, keys): (Vec<i64>, Vec<String>) = renames.events.iter().cloned().unzip();
    tx.execute(
        "UPDATE events SET dedup_key = v.new_key \
         FROM unnest($1::bigint[], $2::text[]) AS v(id, new_key) WHERE events.id = v.id",
        &[&ids, &keys],
    )
    .await?;
    let mut old_keys = Vec::new();
    let mut new_keys = Vec::new();
    for row in tx
        .query(
            "SELECT key FROM documents WHERE collection = $1",
            &[&rekey::EFFECT_COLLECTION],
        )
        .await?
    {
        let key: String = row.try_get(0)?;
        if let Some(new) = renames.effect_key(&key) {
            old_keys.push(key);
            new_keys.push(new);
        }
    }
    tx.execute(
        "UPDATE documents SET key = v.new_key \
         FROM unnest($2::text[], $3::text[]) AS v(old_key, new_key) \
         WHERE documents.collection = $1 AND documents.key = v.old_key",
        &[&rekey::EFFECT_COLLECTION, &old_keys, &new_keys],
    )
    .await?;
    let mut claim_keys = Vec::new();
    let mut bodies = Vec::new();
    for row in tx
        .query(
            "SELECT key, body FROM documents WHERE collection = $1",
            &[&rekey::CLAIM_COLLECTION],
        )
        .await?
    {
        let body: String = row.try_get(1)?;
        if let Some(body) = renames.claim_body(&body) {
            claim_keys.push(row.try_get::<_, String>(0)?);
            bodies.push(body);
        }
    }
    tx.execute(
        "UPDATE documents SET body = v.body \
         FROM unnest($2::text[], $3::text[]) AS v(key, body) \
         WHERE documents.collection = $1 AND documents.key = v.key",
        &[&rekey::CLAIM_COLLECTION, &claim_keys, &bodies],
    )
    .await?;
    tracing::info!(
        events = renames.events.len(),
        "migration 6: events re-keyed (numeric ids, types holding a ':')"
    );
    Ok(())
}

/// Runs `op` on a connection of `pool`, the whole of it (getting the connection included)
/// bounded by `limit`.
async fn run_bounded<T, F>(pool: &Pool, limit: Duration, op: F) -> Result<T, StoreError>
where
    F: AsyncFnOnce(&Object) -> Result<T, StoreError>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let client = match tokio::time::timeout_at(deadline, pool.get()).await {
        Ok(client) => client?,
        Err(_) => return Err(StoreError::Timeout(limit)),
    };
    match tokio::time::timeout_at(deadline, op(&client)).await {
        Ok(result) => result,
        Err(_) => {
            // The server or the path to it is stuck: a fresh connection is the only safe
            // choice for the next caller. Dropping the taken connection closes it.
            drop(Object::take(client));
            Err(StoreError::Timeout(limit))
        }
    }
}

/// Folds the sessions' shards of the counts into shard 0 (no session's), then drops rows of
/// shard 0 that count nothing (see [`PostgresStore::compact_counts`]). SKIP LOCKED: a row its
/// session is writing is left for the next time, so compacting never waits for a writer. It
/// can wait only for another compaction's rows of shard 0, and both lock those in (app, type,
/// state) order, so they cannot deadlock.
const COMPACT_COUNTS: [&str; 2] = [
    "WITH taken AS (DELETE FROM event_counts WHERE (app, event_type, state, shard) IN \
         (SELECT app, event_type, state, shard FROM event_counts WHERE shard <> 0 \
          ORDER BY app, event_type, state, shard FOR UPDATE SKIP LOCKED) \
         RETURNING app, event_type, state, n) \
     INSERT INTO event_counts (app, event_type, state, shard, n) \
     SELECT app, event_type, state, 0, CAST(SUM(n) AS BIGINT) FROM taken \
     GROUP BY app, event_type, state ORDER BY app, event_type, state \
     ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = event_counts.n + EXCLUDED.n",
    "DELETE FROM event_counts WHERE (app, event_type, state, shard) IN \
         (SELECT app, event_type, state, shard FROM event_counts \
          WHERE shard = 0 AND n = 0 FOR UPDATE SKIP LOCKED)",
];

async fn compact_counts(pool: &Pool, limit: Duration) -> Result<u64, StoreError> {
    run_bounded(pool, limit, async |c| {
        let mut taken = 0;
        for sql in COMPACT_COUNTS {
            taken += PostgresStore::execute(c, sql, &[]).await?;
        }
        Ok(taken)
    })
    .await
}

/// What this store runs: the shared statements, and its own claims and replay by ids, all
/// rendered once at open.
struct Sql {
    shared: Statements,
    deliveries: DeliveryStatements,
    /// `insert_event` with its deliveries, in one statement (so one transaction): the
    /// event's parameters, then the routes ($9, an array).
    insert_routed: String,
    /// ids → [`schema::EVENT_COLUMNS`].
    events_by_ids: String,
    /// Expired leases first, then due events (see `claim`).
    claims: [String; 2],
    /// Several apps' due events, up to a number each (`claim_apps`): owner, lease until, now,
    /// apps, numbers (arrays side by side).
    claim_apps: String,
    /// now, ids.
    replay_ids: String,
}

impl Sql {
    fn new() -> Self {
        let d = Dialect::Postgres;
        Sql {
            shared: Statements::new(d),
            deliveries: DeliveryStatements::new(d),
            insert_routed: "WITH ins AS (INSERT INTO events (dedup_key, event_type, corp_id, \
                 payload, source, received_at, next_attempt_at, updated_at, app) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $8) \
                 ON CONFLICT (dedup_key) DO NOTHING RETURNING id), \
                 fan AS (INSERT INTO deliveries (event_id, route, app, next_attempt_at, \
                 created_at, updated_at) SELECT ins.id, r.route, $8, $7, $6, $6 \
                 FROM ins CROSS JOIN unnest($9::text[]) AS r(route)) \
                 SELECT id FROM ins"
                .into(),
            events_by_ids: format!(
                "SELECT {} FROM events WHERE id = ANY($1)",
                schema::EVENT_COLUMNS
            ),
            claims: [
                schema::claim_statement(
                    d,
                    "SELECT id FROM events \
                     WHERE state = 'running' AND lease_until < $3 \
                     ORDER BY lease_until LIMIT $4 FOR UPDATE SKIP LOCKED",
                ),
                schema::claim_statement(
                    d,
                    "SELECT id FROM events \
                     WHERE state IN ('pending', 'retry') AND next_attempt_at <= $3 \
                     ORDER BY next_attempt_at, id LIMIT $4 FOR UPDATE SKIP LOCKED",
                ),
            ],
            claim_apps: schema::claim_statement(
                d,
                "SELECT w.id FROM unnest($4::text[], $5::bigint[]) AS s(app, n) \
                 CROSS JOIN LATERAL (SELECT id FROM events \
                 WHERE app = s.app AND state IN ('pending', 'retry') AND next_attempt_at <= $3 \
                 ORDER BY next_attempt_at, id LIMIT s.n FOR UPDATE SKIP LOCKED) AS w",
            ),
            replay_ids: format!("{} id = ANY($2)", schema::REPLAY_SET),
        }
    }
}

impl std::ops::Deref for Sql {
    type Target = Statements;
    fn deref(&self) -> &Statements {
        &self.shared
    }
}

fn events_from_rows(rows: &[Row]) -> Result<Vec<StoredEvent>, StoreError> {
    rows.iter().map(schema::event_from_row).collect()
}

#[async_trait]
impl Store for PostgresStore {
    async fn schedule(&self, event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError> {
        let result = self
            .run(async |c| {
                // A concurrent insert of the same key by another replica makes this one wait for
                // that transaction; if it commits, this does nothing and the select below sees it.
                let source = event.source.as_str();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                    &event.dedup_key,
                    &event.event_type,
                    &event.corp_id,
                    &event.payload,
                    &source,
                    &event.received_at,
                    &due_at_ms,
                    &event.app,
                ];
                let row = if event.routes.is_empty() {
                    Self::query_opt(c, &self.sql.insert_event, &params).await?
                } else {
                    let mut with_routes = params.to_vec();
                    with_routes.push(&event.routes);
                    Self::query_opt(c, &self.sql.insert_routed, &with_routes).await?
                };
                if let Some(row) = row {
                    return Ok(Inserted::Stored {
                        id: row.try_get(0)?,
                    });
                }
                let row = Self::query_opt(c, &self.sql.event_id_by_key, &[&event.dedup_key])
                    .await?
                    .ok_or_else(|| {
                        StoreError::Invalid(
                            "a conflicting event vanished before it could be read".into(),
                        )
                    })?;
                Ok(Inserted::Duplicate {
                    id: row.try_get(0)?,
                })
            })
            .await;
        self.inserts.record(&result);
        result
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let now = now_millis();
        self.inserts.check(now)?;
        self.run(async |c| {
            Self::execute(c, &self.sql.probe, &[&now]).await?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError> {
        self.run(async |c| {
            Self::query_opt(c, &self.sql.get_event, &[&id])
                .await?
                .as_ref()
                .map(schema::event_from_row)
                .transpose()
        })
        .await
    }

    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.run(async |c| {
            Self::query_opt(c, &self.sql.event_by_key, &[&key])
                .await?
                .as_ref()
                .map(schema::event_from_row)
                .transpose()
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let (sql, params) = super::schema::list_events(super::schema::Dialect::Postgres, query);
        let values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = params
            .into_iter()
            .map(|p| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                match p {
                    super::schema::Param::Text(t) => Box::new(t),
                    super::schema::Param::Int(i) => Box::new(i),
                }
            })
            .collect();
        self.run(async |c| {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
                .iter()
                .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let rows = Self::query(c, &sql, &refs).await?;
            events_from_rows(&rows)
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            let rows = Self::query(c, &self.sql.count_events, &[]).await?;
            let n: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(schema::count(n))
        })
        .await
    }

    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let lease_until = now_ms.saturating_add(lease_ms);
        let limit = i64::from(limit);
        // SKIP LOCKED: rows another replica is claiming right now are passed over instead of
        // waited for; once that claim commits they are `running` with a live lease, which the
        // re-check of the WHERE clause under the row lock rejects. So no event is shared.
        // Two statements, each walking a partial index in order (events_leased, then
        // events_waiting), so a claim costs the same with 10 or 10 million waiting events.
        let [expired, due] = &self.sql.claims;
        self.run(async |c| {
            let rows = Self::query(c, expired, &[&owner, &lease_until, &now_ms, &limit]).await?;
            let mut events = events_from_rows(&rows)?;
            let left = limit - events.len() as i64;
            if left > 0 {
                let rows = Self::query(c, due, &[&owner, &lease_until, &now_ms, &left]).await?;
                events.extend(events_from_rows(&rows)?);
            }
            // RETURNING has no defined order.
            events.sort_by_key(|e| (e.next_attempt_at, e.id));
            Ok(events)
        })
        .await
    }

    async fn claim_apps(
        &self,
        owner: &str,
        shares: &[(String, u32)],
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let lease_until = now_ms.saturating_add(lease_ms);
        // One statement for every app's part: one round trip and one commit.
        let apps: Vec<&str> = shares.iter().map(|(app, _)| app.as_str()).collect();
        let limits: Vec<i64> = shares.iter().map(|(_, n)| i64::from(*n)).collect();
        self.run(async |c| {
            let rows = Self::query(
                c,
                &self.sql.claim_apps,
                &[&owner, &lease_until, &now_ms, &apps, &limits],
            )
            .await?;
            let mut events = events_from_rows(&rows)?;
            events.sort_by_key(|e| (e.next_attempt_at, e.id));
            Ok(events)
        })
        .await
    }

    async fn waiting_apps(&self) -> Result<Vec<String>, StoreError> {
        self.run(async |c| {
            let rows = Self::query(c, &self.sql.waiting_apps, &[]).await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(StoreError::from))
                .collect()
        })
        .await
    }

    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.run(async |c| {
            let n = Self::execute(c, &self.sql.mark_done, &[&id, &owner, &now_ms]).await?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_retry(
        &self,
        id: i64,
        owner: &str,
        at_ms: i64,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let handled = schema::handled_column(handled);
        self.run(async |c| {
            let n = Self::execute(
                c,
                &self.sql.mark_retry,
                &[&id, &owner, &at_ms, &error, &now_ms, &handled],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_dead(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let handled = schema::handled_column(handled);
        self.run(async |c| {
            let n = Self::execute(
                c,
                &self.sql.mark_dead,
                &[&id, &owner, &error, &now_ms, &handled],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn prune_events(&self, rule: &PruneEvents) -> Result<u64, StoreError> {
        // One statement, so one transaction: the rows chosen are locked (rows a worker or a
        // replay holds are skipped, and rechecked if they changed), then their runs, their
        // deliveries and they go.
        let sql = format!(
            "WITH doomed AS ({} FOR UPDATE OF e SKIP LOCKED), \
             runs AS (DELETE FROM event_runs x USING doomed WHERE x.event_id = doomed.id), \
             deliveries AS (DELETE FROM deliveries x USING doomed WHERE x.event_id = doomed.id), \
             gone AS (DELETE FROM events x USING doomed WHERE x.id = doomed.id RETURNING x.id) \
             SELECT COUNT(*) FROM gone",
            schema::prune_select(Dialect::Postgres, rule.state)
        );
        let limit = i64::from(rule.limit);
        self.run(async |c| {
            let rows = Self::query(
                c,
                &sql,
                &[
                    &rule.app,
                    &rule.before_ms,
                    &rule.dead_deliveries_before_ms,
                    &limit,
                ],
            )
            .await?;
            let n: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(schema::count(n))
        })
        .await
    }

    async fn discard(&self, ids: &[i64]) -> Result<u64, StoreError> {
        // One statement, so one transaction: the dead ones among the ids are locked (one a
        // replay holds is skipped), then their runs, their deliveries and they go.
        const SQL: &str = "WITH doomed AS (SELECT e.id FROM events e \
             WHERE e.id = ANY($1) AND e.state = 'dead' FOR UPDATE OF e SKIP LOCKED), \
             runs AS (DELETE FROM event_runs x USING doomed WHERE x.event_id = doomed.id), \
             deliveries AS (DELETE FROM deliveries x USING doomed WHERE x.event_id = doomed.id), \
             gone AS (DELETE FROM events x USING doomed WHERE x.id = doomed.id RETURNING x.id) \
             SELECT COUNT(*) FROM gone";
        let ids = ids.to_vec();
        self.run(async |c| {
            let rows = Self::query(c, SQL, &[&ids]).await?;
            let n: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(schema::count(n))
        })
        .await
    }

    async fn prune_documents(
        &self,
        collection: &str,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let limit = i64::from(limit);
        self.run(async |c| {
            Self::execute(
                c,
                schema::PRUNE_DOCUMENTS,
                &[&collection, &before_ms, &limit],
            )
            .await
        })
        .await
    }

    async fn runs(&self, id: i64, limit: u32) -> Result<Vec<EventRun>, StoreError> {
        self.run(async |c| {
            let rows = Self::query(c, &self.sql.event_runs, &[&id, &i64::from(limit)]).await?;
            let mut runs = rows
                .iter()
                .map(schema::run_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            runs.reverse();
            Ok(runs)
        })
        .await
    }

    async fn release(&self, owners: &[String], now_ms: i64) -> Result<u64, StoreError> {
        self.run(async |c| {
            Self::execute(
                c,
                "UPDATE events SET state = 'pending', attempts = GREATEST(attempts - 1, 0), \
                 lease_owner = NULL, lease_until = NULL, updated_at = $2 \
                 WHERE state = 'running' AND lease_owner = ANY($1)",
                &[&owners, &now_ms],
            )
            .await
        })
        .await
    }

    async fn replay(&self, selector: &ReplaySelector, now_ms: i64) -> Result<u64, StoreError> {
        self.run(async |c| {
            let changed = match selector {
                ReplaySelector::Ids(ids) => {
                    Self::execute(c, &self.sql.replay_ids, &[&now_ms, ids]).await?
                }
                ReplaySelector::State(state) => {
                    Self::execute(c, &self.sql.replay_state, &[&now_ms, &state.as_str()]).await?
                }
                ReplaySelector::Since(since) => {
                    Self::execute(c, &self.sql.replay_since, &[&now_ms, since]).await?
                }
            };
            Ok(changed)
        })
        .await
    }

    async fn stats_for(&self, app: Option<&str>, now_ms: i64) -> Result<Stats, StoreError> {
        let stats = self
            .run_on(&self.stats_pool, async |c| {
                let rows = match app {
                    None => Self::query(c, &self.sql.stats_counts, &[]).await?,
                    Some(app) => Self::query(c, &self.sql.stats_counts_app, &[&app]).await?,
                };
                let counts = rows
                    .iter()
                    .map(|row| {
                        Ok((
                            row.try_get(0)?,
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let oldest = match app {
                    None => Self::query(c, &self.sql.stats_oldest, &[])
                        .await?
                        .iter()
                        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                        .collect::<Result<Vec<_>, StoreError>>()?,
                    Some(app) => {
                        match Self::query_opt(c, &self.sql.stats_oldest_app, &[&app]).await? {
                            Some(row) => vec![(app.to_owned(), row.try_get(0)?)],
                            None => Vec::new(),
                        }
                    }
                };
                Ok(schema::stats_from(counts, oldest, app, now_ms))
            })
            .await?;
        let last = self.compacted_at.load(Ordering::Relaxed);
        if now_millis().saturating_sub(last) >= COMPACT_EVERY_MS
            && self
                .compacted_at
                .compare_exchange(last, now_millis(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // In the background, on the stats connection: this scrape does not wait for it,
            // the next may (milliseconds), the handlers never do.
            let (pool, limit) = (self.stats_pool.clone(), self.options.operation_timeout);
            tokio::spawn(async move {
                if let Err(e) = compact_counts(&pool, limit).await {
                    tracing::warn!(error = %e, "could not compact the event counts");
                }
            });
        }
        Ok(stats)
    }

    async fn put_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let body = body.to_string();
        self.run(async |c| {
            Self::execute(
                c,
                &self.sql.put_document,
                &[&collection, &key, &body, &now_ms],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn insert_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let body = body.to_string();
        self.run(async |c| {
            let n = Self::execute(
                c,
                &self.sql.insert_document,
                &[&collection, &key, &body, &now_ms],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_document(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        self.run(async |c| {
            let row = Self::query_opt(c, &self.sql.get_document, &[&collection, &key]).await?;
            row.as_ref().map(schema::document_from_row).transpose()
        })
        .await
    }

    async fn list_documents(
        &self,
        collection: &str,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError> {
        let limit = i64::from(limit);
        self.run(async |c| {
            let rows = Self::query(c, &self.sql.list_documents, &[&collection, &limit]).await?;
            rows.iter().map(schema::document_from_row).collect()
        })
        .await
    }

    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.run(async |c| {
            // One statement: replicas adding at once are serialised by the row lock, so no
            // increment is lost.
            let row = Self::query_opt(c, &self.sql.add_api_calls, &[&month, &n])
                .await?
                .ok_or_else(|| StoreError::Invalid("the counter upsert returned no row".into()))?;
            Ok(schema::count(row.try_get(0)?))
        })
        .await
    }

    async fn api_calls(&self, month: &str) -> Result<u64, StoreError> {
        self.run(async |c| {
            let total: Option<i64> =
                match Self::query_opt(c, &self.sql.api_calls, &[&month]).await? {
                    Some(row) => Some(row.try_get(0)?),
                    None => None,
                };
            Ok(total.map_or(0, schema::count))
        })
        .await
    }

    async fn close(&self) {
        // Every write has committed by the time its caller got an answer, so there is no
        // queue to drain: closing drops idle connections and refuses new operations.
        self.pool.close();
        self.stats_pool.close();
    }

    async fn try_lead(&self, name: &str) -> Result<Option<super::LeaderGuard>, StoreError> {
        let key = leader_lock_key(name);
        let limit = self.options.operation_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(client) => client?,
            Err(_) => return Err(StoreError::Timeout(limit)),
        };
        // A session-level lock: it lives as long as this connection, which the guard keeps
        // out of the pool, so no other operation can run on (or re-enter) the locked session.
        let attempt = tokio::time::timeout_at(
            deadline,
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
        )
        .await;
        match attempt {
            Ok(Ok(row)) => {
                let locked: bool = row.try_get(0)?;
                if !locked {
                    // Not locked, so the connection is clean and may go back to the pool.
                    return Ok(None);
                }
                let lock = PgLeaderLock {
                    client: Some(client),
                    key,
                    timeout: limit,
                };
                Ok(Some(super::LeaderGuard::held(name, Box::new(lock))))
            }
            // Whether the server took the lock is unknown: ending the session is the only way
            // to be sure it is not held by a connection the pool would hand out again.
            Ok(Err(e)) => {
                drop(Object::take(client));
                Err(e.into())
            }
            Err(_) => {
                drop(Object::take(client));
                Err(StoreError::Timeout(limit))
            }
        }
    }

    fn deliveries(&self) -> &dyn super::Deliveries {
        self
    }
}

fn deliveries_from_rows(rows: &[Row]) -> Result<Vec<StoredDelivery>, StoreError> {
    rows.iter().map(delivery_from_row).collect()
}

#[async_trait]
impl super::Deliveries for PostgresStore {
    async fn claim_deliveries(
        &self,
        route: &str,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<(StoredDelivery, StoredEvent)>, StoreError> {
        let lease_until = now_ms.saturating_add(lease_ms);
        self.run(async |c| {
            let mut claimed = Vec::new();
            for claim in &self.sql.deliveries.claims {
                let left = i64::from(limit) - claimed.len() as i64;
                if left <= 0 {
                    break;
                }
                let rows =
                    Self::query(c, claim, &[&owner, &lease_until, &now_ms, &left, &route]).await?;
                claimed.extend(deliveries_from_rows(&rows)?);
            }
            if claimed.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<i64> = claimed.iter().map(|d| d.event_id).collect();
            let events: std::collections::HashMap<i64, StoredEvent> =
                events_from_rows(&Self::query(c, &self.sql.events_by_ids, &[&ids]).await?)?
                    .into_iter()
                    .map(|e| (e.id, e))
                    .collect();
            let mut out: Vec<(StoredDelivery, StoredEvent)> = claimed
                .into_iter()
                .filter_map(|d| events.get(&d.event_id).cloned().map(|e| (d, e)))
                .collect();
            out.sort_by_key(|(d, _)| (d.next_attempt_at, d.id));
            Ok(out)
        })
        .await
    }

    async fn finish_delivery(
        &self,
        id: i64,
        owner: &str,
        outcome: &DeliveryOutcome,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let d = &self.sql.deliveries;
        let n = self
            .run(async |c| match outcome {
                DeliveryOutcome::Done { status } => {
                    let status = status.map(i64::from);
                    Self::execute(c, &d.done, &[&id, &owner, &now_ms, &status]).await
                }
                DeliveryOutcome::Retry { at, error, status } => {
                    let status = status.map(i64::from);
                    Self::execute(c, &d.retry, &[&id, &owner, at, error, &now_ms, &status]).await
                }
                DeliveryOutcome::Dead { error, status } => {
                    let status = status.map(i64::from);
                    Self::execute(c, &d.dead, &[&id, &owner, error, &now_ms, &status]).await
                }
            })
            .await?;
        Ok(n == 1)
    }

    async fn release_deliveries(&self, owner: &str, now_ms: i64) -> Result<u64, StoreError> {
        self.run(async |c| Self::execute(c, &self.sql.deliveries.release, &[&owner, &now_ms]).await)
            .await
    }

    async fn get_delivery(&self, id: i64) -> Result<Option<StoredDelivery>, StoreError> {
        self.run(async |c| {
            Self::query_opt(c, &self.sql.deliveries.get, &[&id])
                .await?
                .map(|r| delivery_from_row(&r))
                .transpose()
        })
        .await
    }

    async fn list_deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> Result<Vec<StoredDelivery>, StoreError> {
        let state = query.state.map(|s| s.as_str());
        let limit = i64::from(query.limit.unwrap_or(100));
        self.run(async |c| {
            let rows = Self::query(
                c,
                &self.sql.deliveries.list,
                &[&query.route, &state, &query.event_id, &query.since, &limit],
            )
            .await?;
            deliveries_from_rows(&rows)
        })
        .await
    }

    async fn replay_deliveries(
        &self,
        which: &DeliveryReplay,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let d = &self.sql.deliveries;
        self.run(async |c| match which {
            DeliveryReplay::Ids(ids) => {
                let mut total = 0;
                for id in ids {
                    total += Self::execute(c, &d.replay_id, &[&now_ms, id]).await?;
                }
                Ok(total)
            }
            DeliveryReplay::RouteState { route, state } => {
                Self::execute(c, &d.replay_route_state, &[&now_ms, route, &state.as_str()]).await
            }
            DeliveryReplay::State(state) => {
                Self::execute(c, &d.replay_state, &[&now_ms, &state.as_str()]).await
            }
            DeliveryReplay::Since { since, route } => {
                Self::execute(c, &d.replay_since, &[&now_ms, since, route]).await
            }
        })
        .await
    }

    async fn redeliver(
        &self,
        event_id: i64,
        app: &str,
        routes: &[String],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.run(async |c| {
            let mut total = 0;
            for route in routes {
                total += Self::execute(
                    c,
                    &self.sql.deliveries.redeliver,
                    &[&event_id, route, &app, &now_ms],
                )
                .await?;
            }
            Ok(total)
        })
        .await
    }

    async fn route_backlogs(&self, now_ms: i64) -> Result<Vec<RouteBacklog>, StoreError> {
        self.run(async |c| {
            let counts = Self::query(c, &self.sql.deliveries.counts, &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<(String, String, i64)>, StoreError>>()?;
            let oldest = Self::query(c, &self.sql.deliveries.oldest_due, &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<(String, Option<i64>)>, StoreError>>()?;
            Ok(super::deliveries::backlogs(counts, oldest, now_ms))
        })
        .await
    }

    async fn pause_route(&self, route: &str, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        self.run(async |c| {
            Self::execute(c, &self.sql.deliveries.pause, &[&route, &reason, &now_ms]).await
        })
        .await
        .map(|_| ())
    }

    async fn resume_route(&self, route: &str) -> Result<bool, StoreError> {
        let n = self
            .run(async |c| Self::execute(c, &self.sql.deliveries.resume, &[&route]).await)
            .await?;
        Ok(n == 1)
    }

    async fn route_pauses(&self) -> Result<Vec<RoutePause>, StoreError> {
        self.run(async |c| {
            Self::query(c, &self.sql.deliveries.pauses, &[])
                .await?
                .iter()
                .map(|r| {
                    Ok(RoutePause {
                        route: r.try_get(0)?,
                        reason: r.try_get(1)?,
                        paused_at: r.try_get(2)?,
                    })
                })
                .collect()
        })
        .await
    }
}

/// The advisory-lock key for the leadership called `name`: the first 8 bytes of
/// SHA-256("dinghook-leader:" + name), so every replica and version agrees on it without a
/// table of numbers. Never `MIGRATION_LOCK` (checked in the tests).
pub fn leader_lock_key(name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("dinghook-leader:{name}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// A held `pg_try_advisory_lock` and the session that holds it.
struct PgLeaderLock {
    client: Option<Object>,
    key: i64,
    timeout: Duration,
}

#[async_trait]
impl super::LeaderLock for PgLeaderLock {
    async fn release(mut self: Box<Self>) {
        let Some(client) = self.client.take() else {
            return;
        };
        let unlocked = tokio::time::timeout(
            self.timeout,
            client.query_one("SELECT pg_advisory_unlock($1)", &[&self.key]),
        )
        .await;
        match unlocked {
            // Unlocked: the session is clean again and can serve other operations.
            Ok(Ok(row)) if row.try_get::<_, bool>(0).unwrap_or(false) => drop(client),
            _ => {
                tracing::warn!(
                    key = self.key,
                    "could not unlock the leader lock; closing its connection instead"
                );
                drop(Object::take(client));
            }
        }
    }

    fn lost(&self) -> bool {
        self.client.as_ref().is_none_or(|c| c.is_closed())
    }
}

impl Drop for PgLeaderLock {
    fn drop(&mut self) {
        // Not released in order (cancelled or panicked): closing the session is what frees
        // the lock, and it needs no await.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[cfg(test)]
mod leader_tests {
    use super::*;

    #[test]
    fn leader_keys_are_stable_distinct_and_not_the_migration_lock() {
        let recovery = leader_lock_key("recovery");
        assert_eq!(recovery, leader_lock_key("recovery"));
        assert_ne!(recovery, leader_lock_key("something else"));
        assert_ne!(recovery, MIGRATION_LOCK);
    }
}
