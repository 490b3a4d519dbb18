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

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::{NoTls, Row};

use super::redact_url;
use super::{
    Document, EventState, Inserted, ListQuery, NewEvent, ReplaySelector, Stats, Store, StoreError,
    StoredEvent,
};
use crate::time::now_millis;

/// Schema migrations, applied in order; `dinghook_migrations` records which ran. Kept in step
/// with the SQLite list so both backends have the same tables and indexes.
const MIGRATIONS: &[&str] = &[
    r#"
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
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX events_due ON events (state, next_attempt_at);
CREATE INDEX events_type ON events (event_type);
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at BIGINT NOT NULL);
"#,
    r#"
CREATE INDEX events_lease ON events (state, lease_until);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls BIGINT NOT NULL);
"#,
    // Claims read these in order and stop at the limit: no sort over the whole backlog.
    r#"
CREATE INDEX events_waiting ON events (next_attempt_at, id) WHERE state IN ('pending', 'retry');
CREATE INDEX events_leased ON events (lease_until) WHERE state = 'running';
DROP INDEX events_due;
DROP INDEX events_lease;
"#,
    // Documents of the built-in handlers, and views that show the main collections as tables.
    r#"
CREATE TABLE documents (
    collection TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    body       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE INDEX documents_updated ON documents (collection, updated_at);
CREATE VIEW groups AS SELECT
    key AS open_conversation_id,
    body::jsonb ->> 'title' AS title,
    body::jsonb ->> 'status' AS status,
    body::jsonb ->> 'robot_code' AS robot_code,
    body::jsonb ->> 'cool_app_code' AS cool_app_code,
    body::jsonb ->> 'corp_id' AS corp_id,
    body::jsonb ->> 'operator' AS operator,
    body::jsonb ->> 'installed_at' AS installed_at,
    updated_at
    FROM documents WHERE collection = 'group';
CREATE VIEW todos AS SELECT
    key AS task_id,
    body::jsonb ->> 'subject' AS subject,
    body::jsonb ->> 'done' AS done,
    body::jsonb ->> 'deleted' AS deleted,
    body::jsonb ->> 'notification_task_id' AS notification_task_id,
    updated_at
    FROM documents WHERE collection = 'todo';
CREATE VIEW notifications AS SELECT
    key AS task_id,
    body::jsonb ->> 'kind' AS kind,
    body::jsonb ->> 'userids' AS userids,
    body::jsonb ->> 'status' AS status,
    body::jsonb ->> 'result' AS result,
    created_at,
    updated_at
    FROM documents WHERE collection = 'notification';
"#,
];

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
    options: PostgresOptions,
}

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

        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(options.pool_wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        let store = PostgresStore { pool, options };
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
            if done > MIGRATIONS.len() {
                tracing::warn!(
                    schema_version = done,
                    known = MIGRATIONS.len(),
                    "the database schema is newer than this binary"
                );
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
                tx.batch_execute(sql).await?;
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
        let limit = self.options.operation_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
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

const EVENT_COLUMNS: &str = "id, dedup_key, event_type, corp_id, payload, source, received_at, \
     state, attempts, next_attempt_at, last_error, updated_at";

fn event_from_row(row: &Row) -> Result<StoredEvent, StoreError> {
    let state: String = row.try_get(7)?;
    Ok(StoredEvent {
        id: row.try_get(0)?,
        dedup_key: row.try_get(1)?,
        event_type: row.try_get(2)?,
        corp_id: row.try_get(3)?,
        payload: row.try_get(4)?,
        source: row.try_get(5)?,
        received_at: row.try_get(6)?,
        state: EventState::parse(&state)
            .ok_or_else(|| StoreError::Invalid(format!("unknown event state {state:?}")))?,
        attempts: row.try_get(8)?,
        next_attempt_at: row.try_get(9)?,
        last_error: row.try_get(10)?,
        updated_at: row.try_get(11)?,
    })
}

fn document_from_row(row: &Row) -> Result<Document, StoreError> {
    let body: String = row.try_get(2)?;
    Ok(Document {
        collection: row.try_get(0)?,
        key: row.try_get(1)?,
        body: serde_json::from_str(&body)
            .map_err(|e| StoreError::Invalid(format!("document body is not JSON: {e}")))?,
        created_at: row.try_get(3)?,
        updated_at: row.try_get(4)?,
    })
}

fn events_from_rows(rows: &[Row]) -> Result<Vec<StoredEvent>, StoreError> {
    rows.iter().map(event_from_row).collect()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl Store for PostgresStore {
    async fn schedule(&self, event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError> {
        self.run(async |c| {
            // A concurrent insert of the same key by another replica makes this one wait for
            // that transaction; if it commits, this does nothing and the select below sees it.
            let row = Self::query_opt(
                c,
                "INSERT INTO events (dedup_key, event_type, corp_id, payload, source, \
                 received_at, next_attempt_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $6) \
                 ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
                &[
                    &event.dedup_key,
                    &event.event_type,
                    &event.corp_id,
                    &event.payload,
                    &event.source.as_str(),
                    &event.received_at,
                    &due_at_ms,
                ],
            )
            .await?;
            if let Some(row) = row {
                return Ok(Inserted::Stored {
                    id: row.try_get(0)?,
                });
            }
            let row = Self::query_opt(
                c,
                "SELECT id FROM events WHERE dedup_key = $1",
                &[&event.dedup_key],
            )
            .await?
            .ok_or_else(|| {
                StoreError::Invalid("a conflicting event vanished before it could be read".into())
            })?;
            Ok(Inserted::Duplicate {
                id: row.try_get(0)?,
            })
        })
        .await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let now = now_millis();
        self.run(async |c| {
            Self::execute(
                c,
                "INSERT INTO probe (id, at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
                &[&now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
        self.run(async |c| {
            Self::query_opt(c, &sql, &[&id])
                .await?
                .as_ref()
                .map(event_from_row)
                .transpose()
        })
        .await
    }

    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE dedup_key = $1");
        self.run(async |c| {
            Self::query_opt(c, &sql, &[&key])
                .await?
                .as_ref()
                .map(event_from_row)
                .transpose()
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let state = query.state.map(EventState::as_str);
        let event_type = query.event_type.as_deref();
        let limit = i64::from(query.limit.unwrap_or(100));
        // The casts give the optional parameters a type the server can infer.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE ($1::TEXT IS NULL OR state = $1) AND ($2::TEXT IS NULL OR event_type = $2) \
             ORDER BY id DESC LIMIT $3"
        );
        self.run(async |c| {
            let rows = Self::query(c, &sql, &[&state, &event_type, &limit]).await?;
            events_from_rows(&rows)
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            let rows = Self::query(c, "SELECT COUNT(*) FROM events", &[]).await?;
            let n: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(count(n))
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
        let expired = format!(
            "UPDATE events SET state = 'running', lease_owner = $1, lease_until = $2, \
             attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT id FROM events \
                 WHERE state = 'running' AND lease_until < $3 \
                 ORDER BY lease_until LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {EVENT_COLUMNS}"
        );
        let due = format!(
            "UPDATE events SET state = 'running', lease_owner = $1, lease_until = $2, \
             attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT id FROM events \
                 WHERE state IN ('pending', 'retry') AND next_attempt_at <= $3 \
                 ORDER BY next_attempt_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {EVENT_COLUMNS}"
        );
        self.run(async |c| {
            let rows = Self::query(c, &expired, &[&owner, &lease_until, &now_ms, &limit]).await?;
            let mut events = events_from_rows(&rows)?;
            let left = limit - events.len() as i64;
            if left > 0 {
                let rows = Self::query(c, &due, &[&owner, &lease_until, &now_ms, &left]).await?;
                events.extend(events_from_rows(&rows)?);
            }
            // RETURNING has no defined order.
            events.sort_by_key(|e| (e.next_attempt_at, e.id));
            Ok(events)
        })
        .await
    }

    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.run(async |c| {
            let n = Self::execute(
                c,
                "UPDATE events SET state = 'done', lease_owner = NULL, lease_until = NULL, \
                 updated_at = $3 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
                &[&id, &owner, &now_ms],
            )
            .await?;
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
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.run(async |c| {
            let n = Self::execute(
                c,
                "UPDATE events SET state = 'retry', next_attempt_at = $3, last_error = $4, \
                 lease_owner = NULL, lease_until = NULL, updated_at = $5 \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
                &[&id, &owner, &at_ms, &error, &now_ms],
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
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.run(async |c| {
            let n = Self::execute(
                c,
                "UPDATE events SET state = 'dead', last_error = $3, lease_owner = NULL, \
                 lease_until = NULL, updated_at = $4 \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
                &[&id, &owner, &error, &now_ms],
            )
            .await?;
            Ok(n == 1)
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
        const SET: &str = "UPDATE events SET state = 'pending', attempts = 0, \
            next_attempt_at = $1, lease_owner = NULL, lease_until = NULL, updated_at = $1 \
            WHERE state <> 'running' AND ";
        self.run(async |c| {
            let changed = match selector {
                ReplaySelector::Ids(ids) => {
                    Self::execute(c, &format!("{SET} id = ANY($2)"), &[&now_ms, ids]).await?
                }
                ReplaySelector::State(state) => {
                    Self::execute(c, &format!("{SET} state = $2"), &[&now_ms, &state.as_str()])
                        .await?
                }
                ReplaySelector::Since(since) => {
                    Self::execute(c, &format!("{SET} received_at >= $2"), &[&now_ms, since]).await?
                }
            };
            Ok(changed)
        })
        .await
    }

    async fn stats(&self, now_ms: i64) -> Result<Stats, StoreError> {
        self.run(async |c| {
            let mut stats = Stats::default();
            for state in EventState::ALL {
                stats.by_state.insert(state.as_str().to_owned(), 0);
            }
            let rows = Self::query(
                c,
                "SELECT event_type, state, COUNT(*) FROM events GROUP BY event_type, state",
                &[],
            )
            .await?;
            for row in &rows {
                let event_type: String = row.try_get(0)?;
                let state: String = row.try_get(1)?;
                let n = count(row.try_get(2)?);
                *stats.by_state.entry(state.clone()).or_insert(0) += n;
                *stats
                    .by_type
                    .entry(event_type)
                    .or_default()
                    .entry(state)
                    .or_insert(0) += n;
            }
            let oldest: Option<i64> = match Self::query_opt(
                c,
                "SELECT MIN(received_at) FROM events WHERE state IN ('pending', 'retry')",
                &[],
            )
            .await?
            {
                Some(row) => row.try_get(0)?,
                None => None,
            };
            stats.oldest_pending_age_ms = oldest.map(|t| now_ms.saturating_sub(t).max(0));
            Ok(stats)
        })
        .await
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
                "INSERT INTO documents (collection, key, body, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (collection, key) DO UPDATE SET body = EXCLUDED.body, \
                 updated_at = EXCLUDED.updated_at",
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
                "INSERT INTO documents (collection, key, body, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4) ON CONFLICT (collection, key) DO NOTHING",
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
            let row = Self::query_opt(
                c,
                "SELECT collection, key, body, created_at, updated_at FROM documents \
                 WHERE collection = $1 AND key = $2",
                &[&collection, &key],
            )
            .await?;
            row.as_ref().map(document_from_row).transpose()
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
            let rows = Self::query(
                c,
                "SELECT collection, key, body, created_at, updated_at FROM documents \
                 WHERE collection = $1 ORDER BY updated_at DESC, key LIMIT $2",
                &[&collection, &limit],
            )
            .await?;
            rows.iter().map(document_from_row).collect()
        })
        .await
    }

    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.run(async |c| {
            // One statement: replicas adding at once are serialised by the row lock, so no
            // increment is lost.
            let row = Self::query_opt(
                c,
                "INSERT INTO api_calls (month, calls) VALUES ($1, $2) \
                 ON CONFLICT (month) DO UPDATE SET calls = api_calls.calls + EXCLUDED.calls \
                 RETURNING calls",
                &[&month, &n],
            )
            .await?
            .ok_or_else(|| StoreError::Invalid("the counter upsert returned no row".into()))?;
            Ok(count(row.try_get(0)?))
        })
        .await
    }

    async fn api_calls(&self, month: &str) -> Result<u64, StoreError> {
        self.run(async |c| {
            let total: Option<i64> =
                match Self::query_opt(c, "SELECT calls FROM api_calls WHERE month = $1", &[&month])
                    .await?
                {
                    Some(row) => Some(row.try_get(0)?),
                    None => None,
                };
            Ok(total.map_or(0, count))
        })
        .await
    }

    async fn close(&self) {
        // Every write has committed by the time its caller got an answer, so there is no
        // queue to drain: closing drops idle connections and refuses new operations.
        self.pool.close();
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
}

/// The advisory-lock key for the leadership called `name`: the first 8 bytes of
/// SHA-256("dinghook-leader:" + name), so every replica and version agrees on it without a
/// table of numbers. Never [`MIGRATION_LOCK`] (checked in the tests).
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
