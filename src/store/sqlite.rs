//! The embedded SQLite store.
//!
//! One writer thread owns the only writing connection and commits in groups: it takes every
//! write that is waiting (up to `max_batch`), runs each inside its own savepoint, commits once
//! (WAL + `synchronous=FULL`, so the commit is fsynced), and only then answers each caller.
//! Concurrent callbacks therefore share one fsync instead of queueing for one each.
//! Reads use a separate connection; WAL lets them run beside the writer. `stats` (scraped by
//! `/metrics`) has a third connection of its own, so a scrape never waits for a handler's read
//! nor a handler for a scrape.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use super::deliveries::{delivery_from_row, DeliveryStatements};
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

/// What the writer calls after the commit (or its failure) to answer the caller.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// One queued write. Given the connection (inside the group transaction) it runs and says
/// whether it succeeded; given `None` (the transaction could not start) it does not run.
/// Either way it returns the completion that answers its caller after the commit.
type Work = Box<dyn FnOnce(Option<&Connection>) -> (bool, Completion) + Send>;

enum Msg {
    Work(Work),
    /// Commit what is queued before this, then stop.
    Stop,
}

pub struct SqliteStore {
    path: PathBuf,
    /// Bounded, so a stalled disk turns into back-pressure (and request time-outs), not
    /// unbounded memory.
    writes: mpsc::Sender<Msg>,
    /// std mutex: held only inside `spawn_blocking`, never across an await.
    reader: Arc<Mutex<Connection>>,
    /// `stats` only (the maintained counts and one index entry: microseconds), apart from the
    /// handlers' and the dispatcher's reads on `reader`.
    stats_reader: Arc<Mutex<Connection>>,
    /// Joined on close, so queued writes are committed before the process exits.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Shared with the closures sent to the writer and the reader.
    sql: Arc<Sql>,
    /// Failed event inserts, which `/readyz` also asks: the probe's own write can succeed
    /// while inserts fail (on a full volume it rewrites one row in WAL space that already
    /// exists).
    inserts: InsertHealth,
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.display().to_string(),
            message: format!("cannot switch to WAL mode (got {mode})"),
        });
    }
    // FULL: the WAL is fsynced at every commit, which is what makes an ack durable.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(open_err)?;
    Ok(conn)
}

/// Applies the schema migrations not yet run, in order, each in its own transaction;
/// `PRAGMA user_version` records how many ran.
fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let done: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in Dialect::Sqlite.migrations().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(&sql)?;
        if i + 1 == rekey::MIGRATION {
            rekey_events(&tx)?;
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Migration 6's data step (see `rekey`): re-keys the events whose key changed, and the
/// documents that name them, inside the migration's transaction.
fn rekey_events(conn: &Connection) -> Result<(), rusqlite::Error> {
    let mut renames = rekey::Renames::default();
    {
        let mut stmt = conn.prepare(rekey::candidates(Dialect::Sqlite))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let payload: String = row.get(2)?;
            renames.consider(row.get(0)?, row.get(1)?, &payload);
        }
    }
    if renames.is_empty() {
        return Ok(());
    }
    let mut update = conn.prepare("UPDATE events SET dedup_key = ?2 WHERE id = ?1")?;
    for (id, key) in &renames.events {
        update.execute(params![id, key])?;
    }
    let effects: Vec<String> = conn
        .prepare("SELECT key FROM documents WHERE collection = ?1")?
        .query_map([rekey::EFFECT_COLLECTION], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut rename =
        conn.prepare("UPDATE documents SET key = ?3 WHERE collection = ?1 AND key = ?2")?;
    for key in effects {
        if let Some(new) = renames.effect_key(&key) {
            rename.execute(params![rekey::EFFECT_COLLECTION, key, new])?;
        }
    }
    let claims: Vec<(String, String)> = conn
        .prepare("SELECT key, body FROM documents WHERE collection = ?1")?
        .query_map([rekey::CLAIM_COLLECTION], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut rewrite =
        conn.prepare("UPDATE documents SET body = ?3 WHERE collection = ?1 AND key = ?2")?;
    for (key, body) in claims {
        if let Some(body) = renames.claim_body(&body) {
            rewrite.execute(params![rekey::CLAIM_COLLECTION, key, body])?;
        }
    }
    tracing::info!(
        events = renames.events.len(),
        "migration 6: events re-keyed (numeric ids, types holding a ':')"
    );
    Ok(())
}

impl SqliteStore {
    /// Opens or creates the database file (and its directory), migrates it and starts the
    /// writer thread.
    pub async fn open(path: &Path, max_batch: usize) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let (writer_conn, reader_conn, stats_conn) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || -> Result<(Connection, Connection, Connection), StoreError> {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                        path: path.display().to_string(),
                        message: format!("cannot create directory {}: {e}", dir.display()),
                    })?;
                }
                let mut writer = open_connection(&path)?;
                migrate(&mut writer).map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    message: format!("migration failed: {e}"),
                })?;
                let reader = open_connection(&path)?;
                let stats = open_connection(&path)?;
                Ok((writer, reader, stats))
            }
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;

        let max_batch = max_batch.max(1);
        let (writes, queue) = mpsc::channel::<Msg>(max_batch * 8);
        let writer = std::thread::Builder::new()
            .name("dinghook-sqlite-writer".into())
            .spawn(move || run_writer(writer_conn, queue, max_batch))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(SqliteStore {
            path,
            writes,
            reader: Arc::new(Mutex::new(reader_conn)),
            stats_reader: Arc::new(Mutex::new(stats_conn)),
            writer: Mutex::new(Some(writer)),
            sql: Arc::new(Sql::new()),
            inserts: InsertHealth::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `f` for the next group commit and waits until that commit is on disk.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let result = conn.map(f);
            let ok = matches!(result, Some(Ok(_)));
            let completion: Completion = Box::new(move |commit| {
                let outcome = match (result, commit) {
                    (Some(Ok(value)), Ok(())) => Ok(value),
                    (Some(Err(e)), _) => Err(StoreError::Sqlite(e)),
                    (_, Err(e)) => Err(e),
                    (None, Ok(())) => Err(StoreError::Task("write was not run".into())),
                };
                // The caller may have timed out and gone; nothing to do then.
                let _ = reply.send(outcome);
            });
            (ok, completion)
        });
        self.writes
            .send(Msg::Work(work))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the read connection in a blocking task.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        Self::read_on(&self.reader, f).await
    }

    /// Runs `f` on `reader` in a blocking task.
    async fn read_on<T, F>(reader: &Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let reader = Arc::clone(reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Task("reader connection poisoned".into()))?;
            f(&conn).map_err(StoreError::Sqlite)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// The group-commit loop. Ends on `Stop` or when every sender is gone.
fn run_writer(conn: Connection, mut queue: mpsc::Receiver<Msg>, max_batch: usize) {
    let mut batch: Vec<Work> = Vec::with_capacity(max_batch);
    let mut done: Vec<Completion> = Vec::with_capacity(max_batch);
    let mut stopping = false;
    while !stopping {
        match queue.blocking_recv() {
            Some(Msg::Work(work)) => batch.push(work),
            Some(Msg::Stop) | None => break,
        }
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(Msg::Work(work)) => batch.push(work),
                Ok(Msg::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let result = commit_batch(&conn, &mut batch, &mut done);
        for completion in done.drain(..) {
            completion(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Commit(e.to_string())),
            });
        }
    }
}

/// Runs each work item in its own savepoint, so one failing item does not undo the others,
/// then commits them all with one fsync.
fn commit_batch(
    conn: &Connection,
    batch: &mut Vec<Work>,
    done: &mut Vec<Completion>,
) -> Result<(), rusqlite::Error> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        done.extend(batch.drain(..).map(|work| work(None).1));
        return Err(e);
    }
    let mut items = batch.drain(..);
    while let Some(work) = items.next() {
        if let Err(e) = run_cached(conn, "SAVEPOINT item") {
            // Without a savepoint a failing item could leave half its changes behind.
            let _ = conn.execute_batch("ROLLBACK");
            done.push(work(None).1);
            done.extend(items.map(|work| work(None).1));
            return Err(e);
        }
        let (ok, completion) = work(Some(conn));
        done.push(completion);
        if !ok && conn.is_autocommit() {
            // SQLite rolled the whole transaction back itself (it does on a full disk or an
            // I/O error in the middle of a statement): the items before this one are gone
            // too. Running the rest would start a new transaction behind the savepoint, so
            // the batch ends here and every caller in it is told it failed.
            done.extend(items.map(|work| work(None).1));
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the group transaction was rolled back by a failing write".into()),
            ));
        }
        if !ok {
            let _ = run_cached(conn, "ROLLBACK TO item");
        }
        let _ = run_cached(conn, "RELEASE item");
    }
    drop(items);
    let committed = run_cached(conn, "COMMIT");
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// What this store runs: the shared statements, and its own claims, release and replay by id,
/// all rendered once at open.
struct Sql {
    shared: Statements,
    deliveries: DeliveryStatements,
    /// Expired leases first, then due events (see `claim`).
    claims: [String; 2],
    /// One app's due events (`claim_app`): owner, lease until, now, limit, app.
    claim_app: String,
    /// owner, now (one statement per owner).
    release: String,
    /// now, id (one statement per id).
    replay_id: String,
}

impl Sql {
    fn new() -> Self {
        let d = Dialect::Sqlite;
        Sql {
            shared: Statements::new(d),
            deliveries: DeliveryStatements::new(d),
            claims: [
                schema::claim_statement(
                    d,
                    "SELECT id FROM events INDEXED BY events_leased \
                     WHERE state = 'running' AND lease_until < $3 \
                     ORDER BY lease_until LIMIT $4",
                ),
                schema::claim_statement(
                    d,
                    "SELECT id FROM events INDEXED BY events_waiting \
                     WHERE state IN ('pending', 'retry') \
                     AND next_attempt_at <= $3 ORDER BY next_attempt_at, id LIMIT $4",
                ),
            ],
            claim_app: schema::claim_statement(
                d,
                "SELECT id FROM events INDEXED BY events_app_waiting \
                 WHERE app = $5 AND state IN ('pending', 'retry') \
                 AND next_attempt_at <= $3 ORDER BY next_attempt_at, id LIMIT $4",
            ),
            release: d.statement(
                "UPDATE events SET state = 'pending', attempts = MAX(attempts - 1, 0), \
                 lease_owner = NULL, lease_until = NULL, updated_at = $2 \
                 WHERE state = 'running' AND lease_owner = $1",
            ),
            replay_id: d.statement(&format!("{} id = $2", schema::REPLAY_SET)),
        }
    }
}

impl std::ops::Deref for Sql {
    type Target = Statements;
    fn deref(&self) -> &Statements {
        &self.shared
    }
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    schema::event_from_row(row)
}

fn document_from_row(row: &Row<'_>) -> rusqlite::Result<Document> {
    schema::document_from_row(row)
}

#[async_trait]
impl Store for SqliteStore {
    async fn schedule(&self, event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError> {
        let sql = Arc::clone(&self.sql);
        let result = self
            .write(move |conn| {
                let id: Option<i64> = conn
                    .prepare_cached(&sql.insert_event)?
                    .query_row(
                        params![
                            event.dedup_key,
                            event.event_type,
                            event.corp_id,
                            event.payload,
                            event.source.as_str(),
                            event.received_at,
                            due_at_ms,
                            event.app,
                        ],
                        |r| r.get(0),
                    )
                    .optional()?;
                match id {
                    Some(id) => {
                        if !event.routes.is_empty() {
                            let mut add = conn.prepare_cached(&sql.deliveries.insert)?;
                            for route in &event.routes {
                                add.execute(params![
                                    id,
                                    route,
                                    event.app,
                                    due_at_ms,
                                    event.received_at
                                ])?;
                            }
                        }
                        Ok(Inserted::Stored { id })
                    }
                    None => {
                        let id = conn
                            .prepare_cached(&sql.event_id_by_key)?
                            .query_row([&event.dedup_key], |r| r.get(0))?;
                        Ok(Inserted::Duplicate { id })
                    }
                }
            })
            .await;
        self.inserts.record(&result);
        result
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let now = now_millis();
        self.inserts.check(now)?;
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            conn.prepare_cached(&sql.probe)?.execute([now])?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            conn.prepare_cached(&sql.get_event)?
                .query_row([id], event_from_row)
                .optional()
        })
        .await
    }

    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        let key = key.to_owned();
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            conn.prepare_cached(&sql.event_by_key)?
                .query_row([key], event_from_row)
                .optional()
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let (sql, params) = super::schema::list_events(super::schema::Dialect::Sqlite, query);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let values = params.into_iter().map(|p| match p {
                super::schema::Param::Text(t) => rusqlite::types::Value::Text(t),
                super::schema::Param::Int(i) => rusqlite::types::Value::Integer(i),
            });
            let rows = stmt.query_map(rusqlite::params_from_iter(values), event_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let n: i64 = conn
                .prepare_cached(&sql.count_events)?
                .query_row([], |r| r.get(0))?;
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
        let owner = owner.to_owned();
        let sql = Arc::clone(&self.sql);
        // One writer thread: the selects and the updates cannot interleave with another claim.
        // Expired leases first, then due events; each statement walks a partial index in order
        // (events_leased, events_waiting) and stops at the limit, so a claim costs the same
        // whatever the backlog. INDEXED BY pins the plan: without statistics SQLite may pick
        // another index and sort every waiting event (and it errors, rather than silently
        // degrading, if the index ever stops fitting the query).
        self.write(move |conn| {
            let lease_until = now_ms.saturating_add(lease_ms);
            let mut events: Vec<StoredEvent> = Vec::new();
            for claim in &sql.claims {
                let left = i64::from(limit) - events.len() as i64;
                if left <= 0 {
                    break;
                }
                let mut stmt = conn.prepare_cached(claim)?;
                let rows =
                    stmt.query_map(params![owner, lease_until, now_ms, left], event_from_row)?;
                for row in rows {
                    events.push(row?);
                }
            }
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
        let owner = owner.to_owned();
        let shares = shares.to_vec();
        let sql = Arc::clone(&self.sql);
        // Every app's part in one write, so one commit (one fsync), not one per app.
        self.write(move |conn| {
            let lease_until = now_ms.saturating_add(lease_ms);
            let mut stmt = conn.prepare_cached(&sql.claim_app)?;
            let mut events = Vec::new();
            for (app, limit) in shares.iter().filter(|(_, n)| *n > 0) {
                let rows = stmt.query_map(
                    params![owner, lease_until, now_ms, i64::from(*limit), app],
                    event_from_row,
                )?;
                for row in rows {
                    events.push(row?);
                }
            }
            events.sort_by_key(|e| (e.next_attempt_at, e.id));
            Ok(events)
        })
        .await
    }

    async fn waiting_apps(&self) -> Result<Vec<String>, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.waiting_apps)?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        let owner = owner.to_owned();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.mark_done)?
                .execute(params![id, owner, now_ms])?;
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
        let (owner, error) = (owner.to_owned(), error.to_owned());
        let handled = schema::handled_column(handled);
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.mark_retry)?
                .execute(params![id, owner, at_ms, error, now_ms, handled])?;
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
        let (owner, error) = (owner.to_owned(), error.to_owned());
        let handled = schema::handled_column(handled);
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.mark_dead)?
                .execute(params![id, owner, error, now_ms, handled])?;
            Ok(n == 1)
        })
        .await
    }

    async fn prune_events(&self, rule: &PruneEvents) -> Result<u64, StoreError> {
        let rule = rule.clone();
        let select = schema::prune_select(Dialect::Sqlite, rule.state);
        self.write(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached(&select)?
                .query_map(
                    params![
                        rule.app,
                        rule.before_ms,
                        rule.dead_deliveries_before_ms,
                        i64::from(rule.limit)
                    ],
                    |r| r.get(0),
                )?
                .collect::<Result<_, _>>()?;
            let mut runs = conn.prepare_cached("DELETE FROM event_runs WHERE event_id = ?1")?;
            let mut deliveries =
                conn.prepare_cached("DELETE FROM deliveries WHERE event_id = ?1")?;
            let mut events = conn.prepare_cached("DELETE FROM events WHERE id = ?1")?;
            let mut deleted = 0;
            for id in ids {
                runs.execute([id])?;
                deliveries.execute([id])?;
                deleted += events.execute([id])? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    async fn discard(&self, ids: &[i64]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        self.write(move |conn| {
            let mut runs = conn.prepare_cached(
                "DELETE FROM event_runs WHERE event_id = ?1 \
                 AND EXISTS (SELECT 1 FROM events WHERE id = ?1 AND state = 'dead')",
            )?;
            let mut deliveries = conn.prepare_cached(
                "DELETE FROM deliveries WHERE event_id = ?1 \
                 AND EXISTS (SELECT 1 FROM events WHERE id = ?1 AND state = 'dead')",
            )?;
            let mut events =
                conn.prepare_cached("DELETE FROM events WHERE id = ?1 AND state = 'dead'")?;
            let mut deleted = 0;
            for id in ids {
                runs.execute([id])?;
                deliveries.execute([id])?;
                deleted += events.execute([id])? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    async fn prune_documents(
        &self,
        collection: &str,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let collection = collection.to_owned();
        let sql = Dialect::Sqlite.statement(schema::PRUNE_DOCUMENTS);
        self.write(move |conn| {
            let n = conn.prepare_cached(&sql)?.execute(params![
                collection,
                before_ms,
                i64::from(limit)
            ])?;
            Ok(n as u64)
        })
        .await
    }

    async fn runs(&self, id: i64, limit: u32) -> Result<Vec<EventRun>, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.event_runs)?;
            let rows = stmt.query_map(params![id, i64::from(limit)], |row| {
                schema::run_from_row(row)
            })?;
            let mut runs = rows.collect::<Result<Vec<_>, _>>()?;
            runs.reverse();
            Ok(runs)
        })
        .await
    }

    async fn release(&self, owners: &[String], now_ms: i64) -> Result<u64, StoreError> {
        let owners = owners.to_vec();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.release)?;
            let mut total = 0;
            for owner in &owners {
                total += stmt.execute(params![owner, now_ms])?;
            }
            Ok(total as u64)
        })
        .await
    }

    async fn replay(&self, selector: &ReplaySelector, now_ms: i64) -> Result<u64, StoreError> {
        let selector = selector.clone();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let changed = match selector {
                ReplaySelector::Ids(ids) => {
                    let mut stmt = conn.prepare_cached(&sql.replay_id)?;
                    let mut total = 0;
                    for id in ids {
                        total += stmt.execute(params![now_ms, id])?;
                    }
                    total
                }
                ReplaySelector::State(state) => conn
                    .prepare_cached(&sql.replay_state)?
                    .execute(params![now_ms, state.as_str()])?,
                ReplaySelector::Since(since) => conn
                    .prepare_cached(&sql.replay_since)?
                    .execute(params![now_ms, since])?,
            };
            Ok(changed as u64)
        })
        .await
    }

    async fn stats_for(&self, app: Option<&str>, now_ms: i64) -> Result<Stats, StoreError> {
        let sql = Arc::clone(&self.sql);
        let app = app.map(str::to_owned);
        // One read transaction, so the counts and the oldest events are of the same moment.
        Self::read_on(&self.stats_reader, move |conn| {
            let tx = conn.unchecked_transaction()?;
            let count_row = |r: &Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
            let (counts, oldest) = match &app {
                None => (
                    tx.prepare_cached(&sql.stats_counts)?
                        .query_map([], count_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                    tx.prepare_cached(&sql.stats_oldest)?
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                ),
                Some(app) => (
                    tx.prepare_cached(&sql.stats_counts_app)?
                        .query_map([app], count_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                    tx.prepare_cached(&sql.stats_oldest_app)?
                        .query_row([app], |r| r.get::<_, i64>(0))
                        .optional()?
                        .map(|due| (app.clone(), due))
                        .into_iter()
                        .collect(),
                ),
            };
            tx.finish()?;
            Ok(schema::stats_from(counts, oldest, app.as_deref(), now_ms))
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
        let (collection, key, body) = (collection.to_owned(), key.to_owned(), body.to_string());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            conn.prepare_cached(&sql.put_document)?
                .execute(params![collection, key, body, now_ms])?;
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
        let (collection, key, body) = (collection.to_owned(), key.to_owned(), body.to_string());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.insert_document)?
                .execute(params![collection, key, body, now_ms])?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_document(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        let (collection, key) = (collection.to_owned(), key.to_owned());
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            conn.prepare_cached(&sql.get_document)?
                .query_row(params![collection, key], document_from_row)
                .optional()
        })
        .await
    }

    async fn list_documents(
        &self,
        collection: &str,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError> {
        let collection = collection.to_owned();
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.list_documents)?;
            let rows = stmt.query_map(params![collection, i64::from(limit)], document_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError> {
        let month = month.to_owned();
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let total: i64 = conn
                .prepare_cached(&sql.add_api_calls)?
                .query_row(params![month, n], |r| r.get(0))?;
            Ok(schema::count(total))
        })
        .await
    }

    async fn api_calls(&self, month: &str) -> Result<u64, StoreError> {
        let month = month.to_owned();
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let total: Option<i64> = conn
                .prepare_cached(&sql.api_calls)?
                .query_row([month], |r| r.get(0))
                .optional()?;
            Ok(total.map_or(0, schema::count))
        })
        .await
    }

    async fn close(&self) {
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            // Everything queued before Stop is committed before the thread exits.
            let _ = self.writes.send(Msg::Stop).await;
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    async fn try_lead(&self, name: &str) -> Result<Option<super::LeaderGuard>, StoreError> {
        // One process writes a SQLite file, so it always leads; its background tasks run
        // their cycles one after another and need no lock among themselves.
        Ok(Some(super::LeaderGuard::local(name)))
    }

    fn deliveries(&self) -> &dyn super::Deliveries {
        self
    }
}

#[async_trait]
impl super::Deliveries for SqliteStore {
    async fn claim_deliveries(
        &self,
        route: &str,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<(StoredDelivery, StoredEvent)>, StoreError> {
        let (route, owner) = (route.to_owned(), owner.to_owned());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let lease_until = now_ms.saturating_add(lease_ms);
            let mut claimed = Vec::new();
            for claim in &sql.deliveries.claims {
                let left = i64::from(limit) - claimed.len() as i64;
                if left <= 0 {
                    break;
                }
                let mut stmt = conn.prepare_cached(claim)?;
                let rows = stmt
                    .query_map(params![owner, lease_until, now_ms, left, route], |r| {
                        delivery_from_row(r)
                    })?;
                for row in rows {
                    claimed.push(row?);
                }
            }
            // Each with its event (in this transaction: claimed rows and events agree).
            let mut get = conn.prepare_cached(&sql.get_event)?;
            let mut out = Vec::with_capacity(claimed.len());
            for delivery in claimed {
                if let Some(event) = get
                    .query_row([delivery.event_id], event_from_row)
                    .optional()?
                {
                    out.push((delivery, event));
                }
            }
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
        let (owner, outcome) = (owner.to_owned(), outcome.clone());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let d = &sql.deliveries;
            let n = match outcome {
                DeliveryOutcome::Done { status } => conn
                    .prepare_cached(&d.done)?
                    .execute(params![id, owner, now_ms, status])?,
                DeliveryOutcome::Retry { at, error, status } => conn
                    .prepare_cached(&d.retry)?
                    .execute(params![id, owner, at, error, now_ms, status])?,
                DeliveryOutcome::Dead { error, status } => conn
                    .prepare_cached(&d.dead)?
                    .execute(params![id, owner, error, now_ms, status])?,
            };
            Ok(n == 1)
        })
        .await
    }

    async fn release_deliveries(&self, owner: &str, now_ms: i64) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.deliveries.release)?
                .execute(params![owner, now_ms])?;
            Ok(n as u64)
        })
        .await
    }

    async fn get_delivery(&self, id: i64) -> Result<Option<StoredDelivery>, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            conn.prepare_cached(&sql.deliveries.get)?
                .query_row([id], |r| delivery_from_row(r))
                .optional()
        })
        .await
    }

    async fn list_deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> Result<Vec<StoredDelivery>, StoreError> {
        let query = query.clone();
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.deliveries.list)?;
            let rows = stmt.query_map(
                params![
                    query.route,
                    query.state.map(|s| s.as_str()),
                    query.event_id,
                    query.since,
                    i64::from(query.limit.unwrap_or(100)),
                ],
                |r| delivery_from_row(r),
            )?;
            rows.collect()
        })
        .await
    }

    async fn replay_deliveries(
        &self,
        which: &DeliveryReplay,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let which = which.clone();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let d = &sql.deliveries;
            let n = match which {
                DeliveryReplay::Ids(ids) => {
                    let mut stmt = conn.prepare_cached(&d.replay_id)?;
                    let mut total = 0;
                    for id in ids {
                        total += stmt.execute(params![now_ms, id])?;
                    }
                    total
                }
                DeliveryReplay::RouteState { route, state } => conn
                    .prepare_cached(&d.replay_route_state)?
                    .execute(params![now_ms, route, state.as_str()])?,
                DeliveryReplay::State(state) => conn
                    .prepare_cached(&d.replay_state)?
                    .execute(params![now_ms, state.as_str()])?,
                DeliveryReplay::Since { since, route } => conn
                    .prepare_cached(&d.replay_since)?
                    .execute(params![now_ms, since, route])?,
            };
            Ok(n as u64)
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
        let (app, routes) = (app.to_owned(), routes.to_vec());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.deliveries.redeliver)?;
            let mut total = 0;
            for route in &routes {
                total += stmt.execute(params![event_id, route, app, now_ms])?;
            }
            Ok(total as u64)
        })
        .await
    }

    async fn route_backlogs(&self, now_ms: i64) -> Result<Vec<RouteBacklog>, StoreError> {
        let sql = Arc::clone(&self.sql);
        Self::read_on(&self.stats_reader, move |conn| {
            let tx = conn.unchecked_transaction()?;
            let counts = tx
                .prepare_cached(&sql.deliveries.counts)?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let oldest = tx
                .prepare_cached(&sql.deliveries.oldest_due)?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.finish()?;
            Ok(super::deliveries::backlogs(counts, oldest, now_ms))
        })
        .await
    }

    async fn pause_route(&self, route: &str, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        let (route, reason) = (route.to_owned(), reason.to_owned());
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            conn.prepare_cached(&sql.deliveries.pause)?
                .execute(params![route, reason, now_ms])?;
            Ok(())
        })
        .await
    }

    async fn resume_route(&self, route: &str) -> Result<bool, StoreError> {
        let route = route.to_owned();
        let sql = Arc::clone(&self.sql);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&sql.deliveries.resume)?
                .execute(params![route])?;
            Ok(n == 1)
        })
        .await
    }

    async fn route_pauses(&self) -> Result<Vec<RoutePause>, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql.deliveries.pauses)?;
            let rows = stmt.query_map([], |r| {
                Ok(RoutePause {
                    route: r.get(0)?,
                    reason: r.get(1)?,
                    paused_at: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}
