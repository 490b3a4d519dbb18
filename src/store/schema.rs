//! The schema and the statements both backends share, written once.
//!
//! Migrations use a few tokens for what the two SQL dialects spell differently (`{id_pk}`,
//! `{bigint}`, `{json:field}`); [`Dialect::migrations`] renders them. Statements are written
//! with PostgreSQL's `$N` placeholders; [`Statements::new`] renders them once per store (SQLite
//! takes `?N`), so no statement text is built on the insert or claim path.
//! Also here: one row mapper each for [`StoredEvent`] and [`Document`] (over [`SqlRow`], which
//! both drivers' rows implement) and the assembly of [`Stats`].

use std::collections::BTreeMap;

use super::{AppStats, Document, EventRun, EventState, ListQuery, Stats, StoredEvent};

/// The SQL dialect a store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Schema migrations, applied in order (each backend records how many ran). Never edit or
/// reorder one that has shipped: databases migrated by earlier versions must match what the
/// tokens render to; a change is a new migration at the end.
///
/// Tokens: `{id_pk}` an auto-incrementing 64-bit key, `{bigint}` a 64-bit integer,
/// `{json:f}` the text of field `f` of the JSON in column `body`, `{of_every_app:c}` true for
/// the documents of collection `c` of every app (column `collection` is `c` or `@<app>/c`),
/// `{app_of:c}` the app such a document belongs to, `{event_counts}`,
/// `{event_counts_per_statement}` and `{event_counts_by_app}` migrations 8, 10 and 11 in each
/// dialect's own words, `{event_runs_trigger}` migration 15's.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id              {id_pk},
    dedup_key       TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    corp_id         TEXT,
    payload         TEXT    NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'push',
    received_at     {bigint} NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'retry', 'done', 'dead')),
    attempts        {bigint} NOT NULL DEFAULT 0,
    next_attempt_at {bigint} NOT NULL,
    lease_owner     TEXT,
    lease_until     {bigint},
    last_error      TEXT,
    updated_at      {bigint} NOT NULL
);
CREATE INDEX events_due ON events (state, next_attempt_at);
CREATE INDEX events_type ON events (event_type);
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at {bigint} NOT NULL);
"#,
    r#"
CREATE INDEX events_lease ON events (state, lease_until);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls {bigint} NOT NULL);
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
    collection TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_at {bigint} NOT NULL,
    updated_at {bigint} NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE INDEX documents_updated ON documents (collection, updated_at);
CREATE VIEW groups AS SELECT
    key AS open_conversation_id,
    {json:title} AS title,
    {json:status} AS status,
    {json:robot_code} AS robot_code,
    {json:cool_app_code} AS cool_app_code,
    {json:corp_id} AS corp_id,
    {json:operator} AS operator,
    {json:installed_at} AS installed_at,
    updated_at
    FROM documents WHERE collection = 'group';
CREATE VIEW todos AS SELECT
    key AS task_id,
    {json:subject} AS subject,
    {json:done} AS done,
    {json:deleted} AS deleted,
    {json:notification_task_id} AS notification_task_id,
    updated_at
    FROM documents WHERE collection = 'todo';
CREATE VIEW notifications AS SELECT
    key AS task_id,
    {json:kind} AS kind,
    {json:userids} AS userids,
    {json:status} AS status,
    {json:result} AS result,
    created_at,
    updated_at
    FROM documents WHERE collection = 'notification';
"#,
    // The handlers of an event that already succeeded (a JSON array of names; NULL: none), so
    // a retry re-runs only the others.
    r#"
ALTER TABLE events ADD COLUMN handled TEXT;
"#,
    // 6: de-duplication keys keep the exact text of the id. Data only: after this text the
    // store re-keys, in the same transaction, the rows whose key changed (src/store/rekey.rs).
    r#"
-- de-duplication keys keep the exact text of the id: rows re-keyed by the store (rekey.rs)
"#,
    // 7: the app each event belongs to (many apps in one deployment). Everything stored before
    // is the `default` app's; other apps' de-duplication keys, documents, counters and
    // leadership names are scoped by name (`store::scoped`), so nothing else changes.
    r#"
ALTER TABLE events ADD COLUMN app TEXT NOT NULL DEFAULT 'default';
CREATE INDEX events_app ON events (app, id);
"#,
    // 8: the counts `stats` reads (by type and state, kept by triggers in the writing
    // transaction, so they cannot drift), and the index the oldest waiting event is read from.
    // The dialects differ too much for tokens: see `SQLITE_EVENT_COUNTS`,
    // `POSTGRES_EVENT_COUNTS`.
    "{event_counts}",
    // 9: each app's waiting events in due order, so a claim can take one app's events without
    // walking another's backlog, and the apps with waiting events can be listed by skipping
    // through it (fair claims across apps).
    r#"
CREATE INDEX IF NOT EXISTS events_app_waiting ON events (app, next_attempt_at, id)
    WHERE state IN ('pending', 'retry');
"#,
    // 10: PostgreSQL counts updates and deletes once per statement (migration 8 counted them
    // row by row, which costs N² in a statement of N rows; SQLite keeps its triggers), see
    // `POSTGRES_COUNTS_PER_STATEMENT`. And `stats` reads the oldest waiting event from
    // `events_waiting` (the first entry is the most overdue), so the index migration 8 added
    // for it goes: every insert paid for it.
    r#"
DROP INDEX events_waiting_since;
{event_counts_per_statement}"#,
    // 11: the counts by app too (`app` is part of the key), so `stats` can report each app's
    // queue from the counts alone. They are computed again from `events`, not carried over
    // from the rows before: see `SQLITE_COUNTS_BY_APP`, `POSTGRES_COUNTS_BY_APP`.
    "{event_counts_by_app}",
    // 12: the views show every app's documents, with the app they belong to: `default` for a
    // collection written unscoped, `<app>` for one written `@<app>/<name>` (`store::scoped`).
    // They read every document now (a scoped collection has no prefix an index could find
    // without knowing the apps), which suits the operator's queries they are for.
    // IF EXISTS: an operator may have dropped a view, and nothing else depends on them.
    r#"
DROP VIEW IF EXISTS groups;
DROP VIEW IF EXISTS todos;
DROP VIEW IF EXISTS notifications;
CREATE VIEW groups AS SELECT
    {app_of:group} AS app,
    key AS open_conversation_id,
    {json:title} AS title,
    {json:status} AS status,
    {json:robot_code} AS robot_code,
    {json:cool_app_code} AS cool_app_code,
    {json:corp_id} AS corp_id,
    {json:operator} AS operator,
    {json:installed_at} AS installed_at,
    updated_at
    FROM documents WHERE {of_every_app:group};
CREATE VIEW todos AS SELECT
    {app_of:todo} AS app,
    key AS task_id,
    {json:subject} AS subject,
    {json:done} AS done,
    {json:deleted} AS deleted,
    {json:notification_task_id} AS notification_task_id,
    updated_at
    FROM documents WHERE {of_every_app:todo};
CREATE VIEW notifications AS SELECT
    {app_of:notification} AS app,
    key AS task_id,
    {json:kind} AS kind,
    {json:userids} AS userids,
    {json:status} AS status,
    {json:result} AS result,
    created_at,
    updated_at
    FROM documents WHERE {of_every_app:notification};
"#,
    // 13 (routes): one delivery per (event, route), created with the event; and the routes
    // paused by hand, by a 410 Gone or by their circuit breaker.
    r#"
CREATE TABLE deliveries (
    id              {id_pk},
    event_id        {bigint} NOT NULL,
    route           TEXT    NOT NULL,
    app             TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'retry', 'done', 'dead')),
    attempts        {bigint} NOT NULL DEFAULT 0,
    next_attempt_at {bigint} NOT NULL,
    lease_owner     TEXT,
    lease_until     {bigint},
    last_error      TEXT,
    last_status     {bigint},
    created_at      {bigint} NOT NULL,
    updated_at      {bigint} NOT NULL,
    delivered_at    {bigint},
    UNIQUE (event_id, route)
);
CREATE INDEX deliveries_waiting ON deliveries (route, next_attempt_at, id)
    WHERE state IN ('pending', 'retry');
CREATE INDEX deliveries_leased ON deliveries (route, lease_until) WHERE state = 'running';
CREATE INDEX deliveries_route ON deliveries (route, id);
CREATE INDEX deliveries_dead ON deliveries (route) WHERE state = 'dead';
CREATE TABLE route_pauses (
    route      TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    paused_at  {bigint} NOT NULL
);
"#,
    // 14: dead letters listed newest first (the HTTP API, `events list --state dead`) without
    // reading the table; only dead rows are in it, so writes of the live path do not pay.
    r#"
CREATE INDEX IF NOT EXISTS events_dead ON events (id) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS events_app_dead ON events (app, id) WHERE state = 'dead';
"#,
    // 15: every run of an event (the HTTP API's and the console's history of an event),
    // written by a trigger in the transaction that ends the run, so no outcome can be recorded
    // without its run nor a run without its outcome. A run ends when a `running` event leaves
    // that state (`done`, `retry`, `dead`; `pending` when a stopping process gives it back:
    // `released`) or is claimed again by another worker after its lease ran out
    // (`lease_expired`: the worker died or hung). It began when it was claimed: the claim sets
    // `updated_at`, and nothing else changes a running event. `event_runs_event`: an event's
    // runs are read by its id, newest first. Written to run again over itself (IF NOT EXISTS,
    // the trigger dropped first), like migration 14: a database rolled back by hand to an
    // older version keeps its history.
    r#"
CREATE TABLE IF NOT EXISTS event_runs (
    id          {id_pk},
    event_id    {bigint} NOT NULL,
    attempt     {bigint} NOT NULL,
    started_at  {bigint} NOT NULL,
    finished_at {bigint} NOT NULL,
    outcome     TEXT    NOT NULL,
    error       TEXT,
    handled     TEXT,
    worker      TEXT
);
CREATE INDEX IF NOT EXISTS event_runs_event ON event_runs (event_id, id);
{event_runs_trigger}"#,
];

/// What migration 15's trigger inserts for the run that ended (`OLD` the running row, `NEW`
/// what it became), the same words in both dialects.
const RUN_ENDED: &str = "INSERT INTO event_runs (event_id, attempt, started_at, finished_at, \
     outcome, error, handled, worker) \
     VALUES (OLD.id, OLD.attempts, OLD.updated_at, NEW.updated_at, \
     CASE NEW.state WHEN 'running' THEN 'lease_expired' WHEN 'pending' THEN 'released' \
     ELSE NEW.state END, \
     CASE WHEN NEW.state IN ('retry', 'dead') THEN NEW.last_error END, \
     NEW.handled, OLD.lease_owner);";

/// Migration 15's trigger in `dialect`. SQLite: a row trigger, only on the columns a run's end
/// changes. PostgreSQL: a row trigger whose `WHEN` is checked without calling the function,
/// so the updates that end no run (claims of waiting events, replays) pay nothing for it.
fn event_runs_trigger(dialect: Dialect) -> String {
    match dialect {
        Dialect::Sqlite => format!(
            "\nDROP TRIGGER IF EXISTS events_run_ended;\n\
             CREATE TRIGGER events_run_ended AFTER UPDATE OF state, lease_owner ON events\n\
             WHEN OLD.state = 'running' \
             AND (NEW.state <> 'running' OR NEW.lease_owner IS NOT OLD.lease_owner)\n\
             BEGIN\n    {RUN_ENDED}\nEND;\n"
        ),
        Dialect::Postgres => format!(
            "\nCREATE OR REPLACE FUNCTION dinghook_run_ended() RETURNS trigger \
             LANGUAGE plpgsql AS $$\nBEGIN\n    {RUN_ENDED}\n    RETURN NULL;\nEND;\n$$;\n\
             DROP TRIGGER IF EXISTS events_run_ended ON events;\n\
             CREATE TRIGGER events_run_ended AFTER UPDATE ON events FOR EACH ROW\n\
             WHEN (OLD.state = 'running' \
             AND (NEW.state <> 'running' OR NEW.lease_owner IS DISTINCT FROM OLD.lease_owner))\n\
             EXECUTE FUNCTION dinghook_run_ended();\n"
        ),
    }
}

/// Migration 8 for SQLite: one writer, so one row per (type, state) (`shard` is always 0),
/// updated by row triggers. A change of state (or type) moves one from the old row to the new.
const SQLITE_EVENT_COUNTS: &str = r#"
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
CREATE INDEX events_waiting_since ON events (received_at) WHERE state IN ('pending', 'retry');
INSERT INTO event_counts (event_type, state, shard, n)
    SELECT event_type, state, 0, COUNT(*) FROM events GROUP BY event_type, state;
"#;

/// Migration 8 for PostgreSQL; migration 10 replaced its triggers (see there). Replicas write
/// at once, and a counter row stays locked until its transaction's commit is flushed: with one
/// row per (type, state), every insert of a type would wait for the previous one's fsync (a
/// storm of one type: about five times fewer inserts a second, `docs/benchmarks.md`). So each
/// session adds to rows of its own, `shard = pg_backend_pid()`: no two live sessions share a
/// pid, so no writer waits for another's counter row, and a statement touching several rows
/// cannot deadlock on them. `stats` sums the shards; `PostgresStore::compact_counts` folds
/// them into shard 0 (no session's) now and then. The table is locked first, so a replica of
/// the version before cannot write between the count at the end and the triggers.
const POSTGRES_EVENT_COUNTS: &str = r#"
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE event_counts (
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    shard      INTEGER NOT NULL,
    n          BIGINT  NOT NULL,
    PRIMARY KEY (event_type, state, shard)
);
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
CREATE INDEX events_waiting_since ON events (received_at) WHERE state IN ('pending', 'retry');
INSERT INTO event_counts (event_type, state, shard, n)
    SELECT event_type, state, 0, COUNT(*) FROM events GROUP BY event_type, state;
"#;

/// Migration 10 for PostgreSQL: the triggers of migration 8, replaced. Migration 8 counted
/// every written row with a row trigger; a statement of many rows (a replay of every dead
/// event, a release, a retention delete) then updated the same counter row once per row inside
/// one transaction, and each update walks every version the transaction already made of it: a
/// statement of N rows cost N² (20 000 rows: seconds, a million: past `statement_timeout`).
/// Updates and deletes are now counted once per statement from transition tables: one upsert
/// per type and state. An insert (one row on every path) keeps a row trigger, the cheapest,
/// which updates the session's counter row and upserts only when there is none (an upsert runs
/// the speculative insertion first). One INSERT of many rows is still counted row by row:
/// write those in batches. The counts carry over unchanged: the table is locked for the swap.
const POSTGRES_COUNTS_PER_STATEMENT: &str = r#"
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;
DROP TRIGGER events_count_insert ON events;
DROP TRIGGER events_count_update ON events;
DROP TRIGGER events_count_delete ON events;
DROP FUNCTION dinghook_count_event();
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

/// Migration 11 for SQLite: `event_counts` again, keyed by app first, and migration 8's row
/// triggers with the app in the key (a change of app, which only an operator's SQL makes,
/// moves the count like a change of state). Inside the migration's transaction, so nothing is
/// written between the count and the triggers. `IF EXISTS`: whatever an operator (or
/// `scripts/counts-cost.sh`, interrupted) left of the counts, they are made whole again.
const SQLITE_COUNTS_BY_APP: &str = r#"
DROP TRIGGER IF EXISTS events_count_insert;
DROP TRIGGER IF EXISTS events_count_update;
DROP TRIGGER IF EXISTS events_count_delete;
DROP TABLE IF EXISTS event_counts;
CREATE TABLE event_counts (
    app        TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    shard      INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    PRIMARY KEY (app, event_type, state, shard)
) WITHOUT ROWID;
CREATE TRIGGER events_count_insert AFTER INSERT ON events BEGIN
    INSERT INTO event_counts (app, event_type, state, shard, n)
    VALUES (NEW.app, NEW.event_type, NEW.state, 0, 1)
    ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER events_count_update AFTER UPDATE OF state, event_type, app ON events
WHEN OLD.state IS NOT NEW.state OR OLD.event_type IS NOT NEW.event_type
    OR OLD.app IS NOT NEW.app BEGIN
    INSERT INTO event_counts (app, event_type, state, shard, n)
    VALUES (OLD.app, OLD.event_type, OLD.state, 0, -1)
    ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = n + excluded.n;
    INSERT INTO event_counts (app, event_type, state, shard, n)
    VALUES (NEW.app, NEW.event_type, NEW.state, 0, 1)
    ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER events_count_delete AFTER DELETE ON events BEGIN
    INSERT INTO event_counts (app, event_type, state, shard, n)
    VALUES (OLD.app, OLD.event_type, OLD.state, 0, -1)
    ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = n + excluded.n;
END;
INSERT INTO event_counts (app, event_type, state, shard, n)
    SELECT app, event_type, state, 0, COUNT(*) FROM events GROUP BY app, event_type, state;
"#;

/// Migration 11 for PostgreSQL: `event_counts` again, keyed by app first, and migration 10's
/// two functions and three triggers with the app in the key (the update trigger fires on any
/// update, a change of app included). The table is locked first, as for migration 8: a
/// replica of the version before waits, and its inserts are counted by the new functions
/// once this commits. Such a replica's compaction no longer finds its `ON CONFLICT` key and
/// fails (logged, nothing changed) until it is replaced. `IF EXISTS` and `OR REPLACE`:
/// whatever an operator left of the counts, they are made whole again.
const POSTGRES_COUNTS_BY_APP: &str = r#"
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;
DROP TRIGGER IF EXISTS events_count_insert ON events;
DROP TRIGGER IF EXISTS events_count_update ON events;
DROP TRIGGER IF EXISTS events_count_delete ON events;
DROP TABLE IF EXISTS event_counts;
CREATE TABLE event_counts (
    app        TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    shard      INTEGER NOT NULL,
    n          BIGINT  NOT NULL,
    PRIMARY KEY (app, event_type, state, shard)
);
CREATE OR REPLACE FUNCTION dinghook_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE event_counts SET n = n + 1
    WHERE app = NEW.app AND event_type = NEW.event_type AND state = NEW.state
        AND shard = pg_backend_pid();
    IF NOT FOUND THEN
        INSERT INTO event_counts (app, event_type, state, shard, n)
        VALUES (NEW.app, NEW.event_type, NEW.state, pg_backend_pid(), 1)
        ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = event_counts.n + 1;
    END IF;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION dinghook_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO event_counts (app, event_type, state, shard, n)
        SELECT app, event_type, state, pg_backend_pid(), -COUNT(*) FROM old_rows
        GROUP BY app, event_type, state
        ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = event_counts.n + EXCLUDED.n;
    ELSE
        INSERT INTO event_counts (app, event_type, state, shard, n)
        SELECT app, event_type, state, pg_backend_pid(), SUM(d) FROM (
            SELECT app, event_type, state, 1 AS d FROM new_rows
            UNION ALL
            SELECT app, event_type, state, -1 AS d FROM old_rows
        ) AS moved
        GROUP BY app, event_type, state HAVING SUM(d) <> 0
        ON CONFLICT (app, event_type, state, shard) DO UPDATE SET n = event_counts.n + EXCLUDED.n;
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
INSERT INTO event_counts (app, event_type, state, shard, n)
    SELECT app, event_type, state, 0, COUNT(*) FROM events GROUP BY app, event_type, state;
"#;

impl Dialect {
    /// Every migration, in order, in this dialect.
    pub fn migrations(self) -> impl ExactSizeIterator<Item = String> {
        MIGRATIONS.iter().map(move |m| self.render_migration(m))
    }

    /// Replaces the migration tokens (see [`MIGRATIONS`]); other text is copied as it is.
    fn render_migration(self, sql: &str) -> String {
        let mut out = String::with_capacity(sql.len() + 256);
        let mut rest = sql;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let token = &rest[start + 1..];
            let Some(end) = token.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            let (name, after) = (&token[..end], &token[end + 1..]);
            // The same words in both dialects: substr and length count characters in both,
            // and an app name is ASCII.
            let scoped = |collection: &str| {
                let suffix = format!("/{collection}");
                format!(
                    "substr(collection, 1, 1) = '@' AND length(collection) > {} \
                     AND substr(collection, length(collection) - {}) = '{suffix}'",
                    suffix.len() + 1,
                    suffix.len() - 1,
                )
            };
            if let Some(collection) = name.strip_prefix("of_every_app:") {
                out.push_str(&format!(
                    "(collection = '{collection}' OR ({}))",
                    scoped(collection)
                ));
                rest = after;
                continue;
            }
            // The app only where the name is scoped: PostgreSQL may compute it before the
            // view's filter (for a query's `WHERE app = …`), and refuses a negative length.
            if let Some(collection) = name.strip_prefix("app_of:") {
                out.push_str(&format!(
                    "CASE WHEN collection = '{collection}' THEN '{}' \
                     WHEN {} THEN substr(collection, 2, length(collection) - {}) END",
                    super::scoped::DEFAULT_APP,
                    scoped(collection),
                    collection.len() + 2,
                ));
                rest = after;
                continue;
            }
            match (self, name, name.strip_prefix("json:")) {
                (Dialect::Sqlite, "event_counts", _) => out.push_str(SQLITE_EVENT_COUNTS),
                (Dialect::Postgres, "event_counts", _) => out.push_str(POSTGRES_EVENT_COUNTS),
                (Dialect::Sqlite, "event_counts_per_statement", _) => {
                    // SQLite updates a counter row in place: its row triggers stay.
                    out.push_str("-- PostgreSQL only: count triggers per statement\n")
                }
                (Dialect::Postgres, "event_counts_per_statement", _) => {
                    out.push_str(POSTGRES_COUNTS_PER_STATEMENT)
                }
                (Dialect::Sqlite, "event_counts_by_app", _) => out.push_str(SQLITE_COUNTS_BY_APP),
                (Dialect::Postgres, "event_counts_by_app", _) => {
                    out.push_str(POSTGRES_COUNTS_BY_APP)
                }
                (_, "event_runs_trigger", _) => out.push_str(&event_runs_trigger(self)),
                (Dialect::Sqlite, "id_pk", _) => out.push_str("INTEGER PRIMARY KEY AUTOINCREMENT"),
                (Dialect::Postgres, "id_pk", _) => out.push_str("BIGSERIAL PRIMARY KEY"),
                (Dialect::Sqlite, "bigint", _) => out.push_str("INTEGER"),
                (Dialect::Postgres, "bigint", _) => out.push_str("BIGINT"),
                (Dialect::Sqlite, _, Some(field)) => {
                    out.push_str(&format!("json_extract(body, '$.{field}')"))
                }
                (Dialect::Postgres, _, Some(field)) => {
                    out.push_str(&format!("body::jsonb ->> '{field}'"))
                }
                // Not a token: left as written (the unit tests check none is left over).
                _ => out.push_str(&rest[start..start + end + 2]),
            }
            rest = after;
        }
        out.push_str(rest);
        out
    }

    /// A statement written with `$N` placeholders, in this dialect (`?N` for SQLite; the
    /// numbers stay, so a parameter may be used twice).
    pub fn statement(self, sql: &str) -> String {
        match self {
            Dialect::Postgres => sql.to_owned(),
            Dialect::Sqlite => {
                let mut out = String::with_capacity(sql.len());
                let mut chars = sql.chars().peekable();
                while let Some(c) = chars.next() {
                    if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                        out.push('?');
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }
}

/// The columns every statement that builds a [`StoredEvent`] selects or returns, in the order
/// [`event_from_row`] reads them.
/// How far before a listing's `since` its lower id bound is looked for ([`list_events`]):
/// far more than replicas' clocks and commit order ever disagree.
pub const SINCE_SLACK_MS: i64 = 10 * 60 * 1000;

/// A parameter of a built statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Text(String),
    Int(i64),
}

/// The statement listing events for `query` (newest first), with its parameters: only the
/// filters given are in it, and the state is written as a literal, so each backend's planner
/// can use the index that filter needs (the partial indexes of `dead`, waiting and running
/// events; `events_app`; `events_type`) rather than scan the table.
pub fn list_events(dialect: Dialect, query: &ListQuery) -> (String, Vec<Param>) {
    // SQLite's planner, without statistics, would rather read the table newest first than the
    // few running rows of the lease index and sort them.
    let from = match (dialect, query.state) {
        (Dialect::Sqlite, Some(EventState::Running)) => "events INDEXED BY events_leased",
        _ => "events",
    };
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM {from} WHERE 1 = 1");
    let mut params = Vec::new();
    let mut bind = |sql: &mut String, text: &str, param: Param| {
        params.push(param);
        sql.push_str(&format!(" AND {text} ${}", params.len()));
    };
    if let Some(app) = &query.app {
        bind(&mut sql, "app =", Param::Text(app.clone()));
    }
    if let Some(state) = query.state {
        // A literal from the enum, never the caller's text.
        sql.push_str(&format!(" AND state = '{}'", state.as_str()));
        if matches!(state, EventState::Pending | EventState::Retry) {
            // The condition of `events_waiting`, written as the index writes it.
            sql.push_str(" AND state IN ('pending', 'retry')");
        }
    }
    if let Some(event_type) = &query.event_type {
        bind(&mut sql, "event_type =", Param::Text(event_type.clone()));
    }
    if let Some(before) = query.before_id {
        bind(&mut sql, "id <", Param::Int(before));
    }
    if let Some(since) = query.since {
        bind(&mut sql, "received_at >=", Param::Int(since));
        // Every source stamps `received_at` when it inserts, so ids grow with it (up to the
        // clocks of replicas and commit order): the first row received SINCE_SLACK_MS before
        // `since` bounds the ids from below. Newest first then reads only the rows received
        // since (not the whole table when fewer than a page match); the exact condition
        // above still decides.
        bind(
            &mut sql,
            "id >= COALESCE((SELECT id FROM events WHERE received_at >=",
            Param::Int(since.saturating_sub(SINCE_SLACK_MS)),
        );
        sql.push_str(" ORDER BY received_at LIMIT 1), 9223372036854775807)");
    }
    let limit = i64::from(query.limit.unwrap_or(100));
    params.push(Param::Int(limit));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
    (dialect.statement(&sql), params)
}

pub const EVENT_COLUMNS: &str = "id, dedup_key, event_type, corp_id, payload, source, \
     received_at, state, attempts, next_attempt_at, last_error, updated_at, handled, app";

const DOCUMENT_COLUMNS: &str = "collection, key, body, created_at, updated_at";

/// The ids of the events a [`super::PruneEvents`] selects (`$1` app, `$2` before, `$3` dead
/// deliveries before, `$4` limit), oldest first. The state is a literal (the partial index of
/// dead events serves `dead`); the ids are bounded above by the first event received at or
/// after `$2` (`events_received`), so a prune with nothing to delete reads the app's old
/// events only, never the recent ones. `updated_at < $2` decides (an event is updated when or
/// after it is received).
pub fn prune_select(dialect: Dialect, state: EventState) -> String {
    let from = match dialect {
        Dialect::Sqlite => "events e INDEXED BY events_app",
        Dialect::Postgres => "events e",
    };
    let state = state.as_str();
    dialect.statement(&format!(
        "SELECT e.id FROM {from} WHERE e.app = $1 AND e.state = '{state}' \
         AND e.updated_at < $2 \
         AND e.id < COALESCE((SELECT id FROM events WHERE received_at >= $2 \
             ORDER BY received_at LIMIT 1), 9223372036854775807) \
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id \
             AND (d.state IN ('pending', 'running', 'retry') \
                  OR (d.state = 'dead' AND e.updated_at >= $3))) \
         ORDER BY e.id LIMIT $4"
    ))
}

/// Documents of `$1` last changed before `$2`, oldest first, at most `$3`, deleted
/// (`documents_updated` finds them).
pub const PRUNE_DOCUMENTS: &str = "DELETE FROM documents WHERE collection = $1 AND key IN \
     (SELECT key FROM documents WHERE collection = $1 AND updated_at < $2 \
      ORDER BY updated_at LIMIT $3)";

/// The columns of `event_runs` [`run_from_row`] reads, in its order.
const RUN_COLUMNS: &str = "attempt, started_at, finished_at, outcome, error, handled, worker";

/// What a claim sets on the rows it takes (`$1` owner, `$2` lease end, `$3` now); followed by
/// the backend's choice of rows, `(SELECT id … LIMIT $4)`, and [`CLAIM_RETURNING`].
pub const CLAIM_SET: &str = "UPDATE events SET state = 'running', lease_owner = $1, \
     lease_until = $2, attempts = attempts + 1, updated_at = $3 WHERE id IN ";

/// What a claim returns.
pub fn claim_statement(dialect: Dialect, select_ids: &str) -> String {
    dialect.statement(&format!(
        "{CLAIM_SET} ({select_ids}) RETURNING {EVENT_COLUMNS}"
    ))
}

/// What a replay sets (`$1` now); followed by the selection, on `$2`.
pub const REPLAY_SET: &str = "UPDATE events SET state = 'pending', attempts = 0, \
     next_attempt_at = $1, lease_owner = NULL, lease_until = NULL, updated_at = $1 \
     WHERE state <> 'running' AND ";

/// The statements both backends run as they are, rendered once for a store's dialect.
/// Parameters are listed beside each.
#[derive(Debug)]
pub struct Statements {
    /// dedup_key, event_type, corp_id, payload, source, received_at, due_at → `id` or no row.
    pub insert_event: String,
    /// dedup_key → `id`.
    pub event_id_by_key: String,
    /// now.
    pub probe: String,
    /// id → [`EVENT_COLUMNS`].
    pub get_event: String,
    /// dedup_key → [`EVENT_COLUMNS`].
    pub event_by_key: String,
    /// → the apps with waiting (`pending`/`retry`) events, one per row, in name order.
    pub waiting_apps: String,
    pub count_events: String,
    /// id, owner, now.
    pub mark_done: String,
    /// id, owner, at, error, now, handled.
    pub mark_retry: String,
    /// id, owner, error, now, handled.
    pub mark_dead: String,
    /// now, state.
    pub replay_state: String,
    /// now, received since.
    pub replay_since: String,
    /// → (app, event_type, state, count) rows, counts not zero, one per PostgreSQL session
    /// (shard) for the same key, summed by [`stats_from`]: the maintained counts (migrations 8
    /// and 11), whose size is the number of apps and types, not of events.
    pub stats_counts: String,
    /// app → the same rows, of that app only.
    pub stats_counts_app: String,
    /// → (app, earliest `next_attempt_at`) for each app with waiting events: a skip scan of the
    /// partial index `events_app_waiting` (as `waiting_apps`), then that app's first entry in
    /// due order, so it costs two index look-ups per app with waiting events.
    pub stats_oldest: String,
    /// app → that app's earliest `next_attempt_at` of a waiting event, or no row.
    pub stats_oldest_app: String,
    /// collection, key, body, now.
    pub put_document: String,
    /// collection, key, body, now; changes no row if the document exists.
    pub insert_document: String,
    /// collection, key → document columns.
    pub get_document: String,
    /// collection, limit → document columns, most recently updated first.
    pub list_documents: String,
    /// month, n → the new total.
    pub add_api_calls: String,
    /// month → calls.
    pub api_calls: String,
    /// event id, limit → [`RUN_COLUMNS`], newest first.
    pub event_runs: String,
}

impl Statements {
    pub fn new(dialect: Dialect) -> Self {
        let sql = |text: &str| dialect.statement(text);
        // INDEXED BY (SQLite) pins the plans to the partial index of waiting events by app.
        let pin = match dialect {
            Dialect::Sqlite => "INDEXED BY events_app_waiting",
            Dialect::Postgres => "",
        };
        // A skip scan of `events_app_waiting`: each step finds the next app after the last,
        // so the cost grows with the number of apps, not of waiting events.
        let waiting = format!(
            "WITH RECURSIVE waiting(app) AS ( \
             SELECT MIN(app) FROM events {pin} WHERE state IN ('pending', 'retry') \
             UNION ALL \
             SELECT (SELECT MIN(e.app) FROM events e {pin} \
             WHERE e.state IN ('pending', 'retry') AND e.app > waiting.app) \
             FROM waiting WHERE waiting.app IS NOT NULL)"
        );
        // One app's first waiting entry in due order (the index is by app, then due time).
        let first_due = |app: &str| {
            format!(
                "SELECT e.next_attempt_at FROM events e {pin} \
                 WHERE e.app = {app} AND e.state IN ('pending', 'retry') \
                 ORDER BY e.next_attempt_at LIMIT 1"
            )
        };
        Statements {
            insert_event: sql(
                "INSERT INTO events (dedup_key, event_type, corp_id, payload, source, \
                 received_at, next_attempt_at, updated_at, app) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $8) \
                 ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            ),
            event_id_by_key: sql("SELECT id FROM events WHERE dedup_key = $1"),
            probe: sql("INSERT INTO probe (id, at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at"),
            get_event: sql(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1")),
            event_by_key: sql(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE dedup_key = $1"
            )),
            waiting_apps: sql(&format!(
                "{waiting} SELECT app FROM waiting WHERE app IS NOT NULL"
            )),
            count_events: sql("SELECT COUNT(*) FROM events"),
            // A done event replayed runs every handler again.
            mark_done: sql(
                "UPDATE events SET state = 'done', lease_owner = NULL, lease_until = NULL, \
                 handled = NULL, updated_at = $3 \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
            ),
            mark_retry: sql(
                "UPDATE events SET state = 'retry', next_attempt_at = $3, last_error = $4, \
                 handled = $6, lease_owner = NULL, lease_until = NULL, updated_at = $5 \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
            ),
            mark_dead: sql(
                "UPDATE events SET state = 'dead', last_error = $3, handled = $5, \
                 lease_owner = NULL, lease_until = NULL, updated_at = $4 \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
            ),
            replay_state: sql(&format!("{REPLAY_SET} state = $2")),
            replay_since: sql(&format!("{REPLAY_SET} received_at >= $2")),
            // One row per (app, type, state) on SQLite, per session too on PostgreSQL
            // (shards): `stats_from` sums them. Not `GROUP BY`: grouping the rows of a
            // thousand apps costs several times the reading (PostgreSQL sums BIGINT as
            // NUMERIC), and a scrape of a few apps reads a handful of rows either way.
            stats_counts: sql("SELECT app, event_type, state, n FROM event_counts WHERE n <> 0"),
            stats_counts_app: sql(
                "SELECT app, event_type, state, n FROM event_counts WHERE app = $1 AND n <> 0",
            ),
            stats_oldest: sql(&format!(
                "{waiting} SELECT app, ({}) FROM waiting WHERE app IS NOT NULL",
                first_due("waiting.app")
            )),
            stats_oldest_app: sql(&first_due("$1")),
            put_document: sql(&format!(
                "INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (collection, key) DO UPDATE SET body = EXCLUDED.body, \
                 updated_at = EXCLUDED.updated_at"
            )),
            insert_document: sql(&format!(
                "INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (collection, key) DO NOTHING"
            )),
            get_document: sql(&format!(
                "SELECT {DOCUMENT_COLUMNS} FROM documents WHERE collection = $1 AND key = $2"
            )),
            list_documents: sql(&format!(
                "SELECT {DOCUMENT_COLUMNS} FROM documents \
                 WHERE collection = $1 ORDER BY updated_at DESC, key LIMIT $2"
            )),
            // One statement: writers adding at once are serialised by the row lock (or the
            // one SQLite writer), so no increment is lost.
            add_api_calls: sql("INSERT INTO api_calls (month, calls) VALUES ($1, $2) \
                 ON CONFLICT (month) DO UPDATE SET calls = api_calls.calls + EXCLUDED.calls \
                 RETURNING calls"),
            api_calls: sql("SELECT calls FROM api_calls WHERE month = $1"),
            event_runs: sql(&format!(
                "SELECT {RUN_COLUMNS} FROM event_runs WHERE event_id = $1 ORDER BY id DESC LIMIT $2"
            )),
        }
    }
}

/// A result row, as the mappers need it: both drivers' rows implement it, each with its own
/// error type.
pub trait SqlRow {
    type Error;
    fn int(&self, idx: usize) -> Result<i64, Self::Error>;
    fn text(&self, idx: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, idx: usize) -> Result<Option<String>, Self::Error>;
    fn opt_int(&self, idx: usize) -> Result<Option<i64>, Self::Error>;
    /// Column `idx` holds something this version cannot read.
    fn invalid(idx: usize, message: String) -> Self::Error;
}

impl SqlRow for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, idx: usize) -> rusqlite::Result<i64> {
        self.get(idx)
    }
    fn text(&self, idx: usize) -> rusqlite::Result<String> {
        self.get(idx)
    }
    fn opt_text(&self, idx: usize) -> rusqlite::Result<Option<String>> {
        self.get(idx)
    }
    fn opt_int(&self, idx: usize) -> rusqlite::Result<Option<i64>> {
        self.get(idx)
    }
    fn invalid(idx: usize, message: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, message.into())
    }
}

impl SqlRow for tokio_postgres::Row {
    type Error = super::StoreError;
    fn int(&self, idx: usize) -> Result<i64, Self::Error> {
        Ok(self.try_get(idx)?)
    }
    fn text(&self, idx: usize) -> Result<String, Self::Error> {
        Ok(self.try_get(idx)?)
    }
    fn opt_text(&self, idx: usize) -> Result<Option<String>, Self::Error> {
        Ok(self.try_get(idx)?)
    }
    fn opt_int(&self, idx: usize) -> Result<Option<i64>, Self::Error> {
        Ok(self.try_get(idx)?)
    }
    fn invalid(_idx: usize, message: String) -> Self::Error {
        super::StoreError::Invalid(message)
    }
}

/// A row of [`EVENT_COLUMNS`].
pub fn event_from_row<R: SqlRow>(row: &R) -> Result<StoredEvent, R::Error> {
    let state = row.text(7)?;
    let handled = handled_from(row, 12)?;
    Ok(StoredEvent {
        id: row.int(0)?,
        dedup_key: row.text(1)?,
        event_type: row.text(2)?,
        corp_id: row.opt_text(3)?,
        payload: row.text(4)?,
        source: row.text(5)?,
        received_at: row.int(6)?,
        state: EventState::parse(&state)
            .ok_or_else(|| R::invalid(7, format!("unknown event state {state:?}")))?,
        attempts: row.int(8)?,
        next_attempt_at: row.int(9)?,
        last_error: row.opt_text(10)?,
        updated_at: row.int(11)?,
        handled,
        app: row.text(13)?,
    })
}

/// A row of [`RUN_COLUMNS`].
pub fn run_from_row<R: SqlRow>(row: &R) -> Result<EventRun, R::Error> {
    Ok(EventRun {
        attempt: row.int(0)?,
        started_at: row.int(1)?,
        finished_at: Some(row.int(2)?),
        outcome: row.text(3)?,
        error: row.opt_text(4)?,
        handled: handled_from(row, 5)?,
        worker: row.opt_text(6)?,
    })
}

/// The `handled` column at `idx`: a JSON list of handler names, or NULL for none.
fn handled_from<R: SqlRow>(row: &R, idx: usize) -> Result<Vec<String>, R::Error> {
    match row.opt_text(idx)? {
        None => Ok(Vec::new()),
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| R::invalid(idx, format!("handled is not a JSON list of names: {e}"))),
    }
}

/// A row of the document columns.
pub fn document_from_row<R: SqlRow>(row: &R) -> Result<Document, R::Error> {
    let body = row.text(2)?;
    Ok(Document {
        collection: row.text(0)?,
        key: row.text(1)?,
        body: serde_json::from_str(&body)
            .map_err(|e| R::invalid(2, format!("document body is not JSON: {e}")))?,
        created_at: row.int(3)?,
        updated_at: row.int(4)?,
    })
}

/// The `handled` column for a list of handler names: NULL when there are none.
pub fn handled_column(handled: &[String]) -> Option<String> {
    (!handled.is_empty()).then(|| serde_json::Value::from(handled).to_string())
}

/// A count from the database (never negative) as `u64`.
pub fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// [`Stats`] from the rows of [`Statements::stats_counts`] (or `stats_counts_app`) and of
/// [`Statements::stats_oldest`] (or `stats_oldest_app`, with its app). `asked`: the app asked
/// for, shown in [`Stats::by_app`] even without events. The rows of one (app, type, state)
/// (PostgreSQL's shards) are summed signed, since a session may have taken out what another
/// put in; what sums to 0 is left out, as if it had no row.
pub fn stats_from(
    counts: impl IntoIterator<Item = (String, String, String, i64)>,
    oldest: impl IntoIterator<Item = (String, i64)>,
    asked: Option<&str>,
    now_ms: i64,
) -> Stats {
    type Sums = BTreeMap<String, i64>;
    let (mut by_state, mut by_app, mut by_type) = (Sums::new(), BTreeMap::new(), BTreeMap::new());
    for (app, event_type, state, n) in counts {
        *by_state.entry(state.clone()).or_insert(0) += n;
        *by_app
            .entry(app)
            .or_insert_with(Sums::new)
            .entry(state.clone())
            .or_insert(0) += n;
        *by_type
            .entry(event_type)
            .or_insert_with(Sums::new)
            .entry(state)
            .or_insert(0) += n;
    }
    let not_zero = |sums: Sums| sums.into_iter().filter(|&(_, n)| n != 0);
    let every_state = |sums: Sums| {
        let mut counts: BTreeMap<String, u64> = EventState::ALL
            .into_iter()
            .map(|state| (state.as_str().to_owned(), 0))
            .collect();
        for (state, n) in not_zero(sums) {
            *counts.entry(state).or_insert(0) += count(n);
        }
        counts
    };
    let app_stats = |sums: Sums| AppStats {
        by_state: every_state(sums),
        oldest_pending_age_ms: None,
    };
    let age = |due: i64| now_ms.saturating_sub(due).max(0);
    let mut stats = Stats {
        by_state: every_state(by_state),
        by_type: by_type
            .into_iter()
            .filter_map(|(event_type, sums)| {
                let states: BTreeMap<String, u64> =
                    not_zero(sums).map(|(state, n)| (state, count(n))).collect();
                (!states.is_empty()).then_some((event_type, states))
            })
            .collect(),
        ..Stats::default()
    };
    for (app, sums) in by_app {
        if sums.values().any(|&n| n != 0) {
            stats.by_app.insert(app, app_stats(sums));
        }
    }
    if let Some(app) = asked {
        stats
            .by_app
            .entry(app.to_owned())
            .or_insert_with(|| app_stats(Sums::new()));
    }
    let mut earliest: Option<i64> = None;
    for (app, due) in oldest {
        earliest = Some(earliest.map_or(due, |e| e.min(due)));
        stats
            .by_app
            .entry(app)
            .or_insert_with(|| app_stats(Sums::new()))
            .oldest_pending_age_ms = Some(age(due));
    }
    stats.oldest_pending_age_ms = earliest.map(age);
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    // Migrations 1-4 as each store ran them before they were written once (the raw strings
    // are kept to the letter, unindented): databases in the field were made by these texts.
    const OLD_SQLITE: &[&str] = &[
        r#"
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
    updated_at      INTEGER NOT NULL
);
CREATE INDEX events_due ON events (state, next_attempt_at);
CREATE INDEX events_type ON events (event_type);
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
"#,
        r#"
CREATE INDEX events_lease ON events (state, lease_until);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls INTEGER NOT NULL);
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
    collection TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE INDEX documents_updated ON documents (collection, updated_at);
CREATE VIEW groups AS SELECT
    key AS open_conversation_id,
    json_extract(body, '$.title') AS title,
    json_extract(body, '$.status') AS status,
    json_extract(body, '$.robot_code') AS robot_code,
    json_extract(body, '$.cool_app_code') AS cool_app_code,
    json_extract(body, '$.corp_id') AS corp_id,
    json_extract(body, '$.operator') AS operator,
    json_extract(body, '$.installed_at') AS installed_at,
    updated_at
    FROM documents WHERE collection = 'group';
CREATE VIEW todos AS SELECT
    key AS task_id,
    json_extract(body, '$.subject') AS subject,
    json_extract(body, '$.done') AS done,
    json_extract(body, '$.deleted') AS deleted,
    json_extract(body, '$.notification_task_id') AS notification_task_id,
    updated_at
    FROM documents WHERE collection = 'todo';
CREATE VIEW notifications AS SELECT
    key AS task_id,
    json_extract(body, '$.kind') AS kind,
    json_extract(body, '$.userids') AS userids,
    json_extract(body, '$.status') AS status,
    json_extract(body, '$.result') AS result,
    created_at,
    updated_at
    FROM documents WHERE collection = 'notification';
"#,
    ];

    const OLD_POSTGRES: &[&str] = &[
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

    fn sqlite_schema(conn: &Connection) -> Vec<(String, String, String, Option<String>)> {
        let mut stmt = conn
            .prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    fn words(sql: &str) -> Vec<&str> {
        sql.split_whitespace().collect()
    }

    #[test]
    fn every_token_is_rendered_in_both_dialects() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            assert_eq!(dialect.migrations().len(), MIGRATIONS.len());
            for (i, sql) in dialect.migrations().enumerate() {
                assert!(
                    !sql.contains('{') && !sql.contains('}'),
                    "{dialect:?} #{i}: {sql}"
                );
            }
        }
    }

    #[test]
    fn sqlite_renders_the_old_migrations_to_the_letter() {
        let new: Vec<String> = Dialect::Sqlite.migrations().collect();
        assert_eq!(new.len(), OLD_SQLITE.len() + 11, "migrations 5 to 15 added");
        for (i, old) in OLD_SQLITE.iter().enumerate() {
            assert_eq!(&new[i], old, "migration {}", i + 1);
        }
        // And so to the same schema: run both on empty databases and compare.
        let (old_db, new_db) = (
            Connection::open_in_memory().unwrap(),
            Connection::open_in_memory().unwrap(),
        );
        for (old, new) in OLD_SQLITE.iter().zip(&new) {
            old_db.execute_batch(old).unwrap();
            new_db.execute_batch(new).unwrap();
        }
        assert_eq!(sqlite_schema(&old_db), sqlite_schema(&new_db));
        // Migration 5 applies to a database the old texts made.
        old_db.execute_batch(&new[4]).unwrap();
        new_db.execute_batch(&new[4]).unwrap();
        assert_eq!(sqlite_schema(&old_db), sqlite_schema(&new_db));
        let columns: Vec<String> = old_db
            .prepare("SELECT name FROM pragma_table_info('events')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(columns.last().map(String::as_str), Some("handled"));
    }

    #[test]
    fn postgres_renders_the_old_migrations_word_for_word() {
        // Only the spacing of the column lists may differ from the old texts; the suite in
        // tests/store.rs runs the rendering on a real server.
        let new: Vec<String> = Dialect::Postgres.migrations().collect();
        assert_eq!(new.len(), OLD_POSTGRES.len() + 11);
        for (i, old) in OLD_POSTGRES.iter().enumerate() {
            assert_eq!(words(&new[i]), words(old), "migration {}", i + 1);
        }
        assert_eq!(
            words(&new[4]),
            words("ALTER TABLE events ADD COLUMN handled TEXT;")
        );
    }

    #[test]
    fn the_views_show_each_apps_documents_and_no_others() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in Dialect::Sqlite.migrations() {
            conn.execute_batch(&sql).unwrap();
        }
        for collection in [
            "group",
            "@ops/group",
            "@a-1_b/group",
            // Not groups: another collection, of the default app and of another, a name that
            // only ends like one, and a scoped name without an app.
            "groups",
            "@ops/groups",
            "@ops/subgroup",
            "xgroup",
            "@/group",
            "@ops/todo",
        ] {
            conn.execute(
                "INSERT INTO documents (collection, key, body, created_at, updated_at) \
                 VALUES (?1, 'k', '{\"title\": \"t\"}', 1, 1)",
                [collection],
            )
            .unwrap();
        }
        let apps = |view: &str| -> Vec<String> {
            conn.prepare(&format!("SELECT app FROM {view} ORDER BY app"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(apps("groups"), ["a-1_b", "default", "ops"]);
        assert_eq!(apps("todos"), ["ops"]);
        assert!(apps("notifications").is_empty());
    }

    #[test]
    fn placeholders_become_numbered_question_marks_for_sqlite() {
        let sql = "SELECT $1, $12 FROM t WHERE a = '$' AND b = $2";
        assert_eq!(Dialect::Postgres.statement(sql), sql);
        assert_eq!(
            Dialect::Sqlite.statement(sql),
            "SELECT ?1, ?12 FROM t WHERE a = '$' AND b = ?2"
        );
    }

    #[test]
    fn every_sqlite_statement_prepares_on_the_migrated_schema() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in Dialect::Sqlite.migrations() {
            conn.execute_batch(&sql).unwrap();
        }
        let s = Statements::new(Dialect::Sqlite);
        let all = [
            &s.insert_event,
            &s.event_id_by_key,
            &s.probe,
            &s.get_event,
            &s.event_by_key,
            &s.count_events,
            &s.mark_done,
            &s.mark_retry,
            &s.mark_dead,
            &s.replay_state,
            &s.replay_since,
            &s.waiting_apps,
            &s.stats_counts,
            &s.stats_counts_app,
            &s.stats_oldest,
            &s.stats_oldest_app,
            &s.put_document,
            &s.insert_document,
            &s.get_document,
            &s.list_documents,
            &s.add_api_calls,
            &s.api_calls,
        ];
        for sql in all {
            assert!(!sql.contains('$'), "{sql}");
            conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let claim = claim_statement(Dialect::Sqlite, "SELECT id FROM events LIMIT $4");
        conn.prepare(&claim).unwrap();
    }

    #[test]
    fn sqlite_counts_of_a_database_the_old_texts_made_are_computed_on_upgrade() {
        let conn = Connection::open_in_memory().unwrap();
        let new: Vec<String> = Dialect::Sqlite.migrations().collect();
        for old in OLD_SQLITE {
            conn.execute_batch(old).unwrap();
        }
        conn.execute_batch(&new[4]).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 99) \
             INSERT INTO events (dedup_key, event_type, payload, received_at, state, \
                 next_attempt_at, updated_at) \
             SELECT 'k' || i, 't' || (i % 3), '{}', i, \
                 CASE i % 4 WHEN 0 THEN 'done' WHEN 1 THEN 'retry' ELSE 'pending' END, i, i \
             FROM s",
        )
        .unwrap();
        for later in &new[5..] {
            conn.execute_batch(later).unwrap();
        }
        let s = Statements::new(Dialect::Sqlite);
        let read = |sql: &str| -> Vec<(String, String, String, i64)> {
            let mut stmt = conn.prepare(sql).unwrap();
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap();
            let mut rows: Vec<_> = rows.collect::<Result<_, _>>().unwrap();
            rows.sort();
            rows
        };
        let truth = "SELECT app, event_type, state, COUNT(*) FROM events \
                     GROUP BY app, event_type, state";
        assert_eq!(read(&s.stats_counts), read(truth));
        assert!(read(truth).iter().all(|(app, ..)| app == "default"));
        conn.execute(
            "UPDATE events SET state = 'dead' WHERE received_at < 10",
            [],
        )
        .unwrap();
        conn.execute("DELETE FROM events WHERE received_at >= 90", [])
            .unwrap();
        conn.execute(
            "UPDATE events SET app = 'ops' WHERE received_at BETWEEN 40 AND 59",
            [],
        )
        .unwrap();
        assert_eq!(read(&s.stats_counts), read(truth));
        let oldest: Vec<(String, i64)> = conn
            .prepare(&s.stats_oldest)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(oldest, [("default".to_owned(), 10), ("ops".to_owned(), 41)]);
        let ops: i64 = conn
            .query_row(&s.stats_oldest_app, ["ops"], |r| r.get(0))
            .unwrap();
        assert_eq!(ops, 41);
    }

    #[test]
    fn sqlite_stats_never_walk_the_events() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in Dialect::Sqlite.migrations() {
            conn.execute_batch(&sql).unwrap();
        }
        let s = Statements::new(Dialect::Sqlite);
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let app = vec!["ops"; stmt.parameter_count()];
            let rows = stmt
                .query_map(rusqlite::params_from_iter(app), |r| r.get::<_, String>(3))
                .unwrap();
            rows.collect::<Result<Vec<_>, _>>().unwrap().join("; ")
        };
        let counts = plan(&s.stats_counts);
        assert!(
            counts.contains("event_counts") && !counts.contains("events "),
            "{counts}"
        );
        let counts = plan(&s.stats_counts_app);
        assert!(
            counts.contains("SEARCH event_counts") && !counts.contains("events "),
            "{counts}"
        );
        // Per app, in due order over waiting events only; LIMIT 1 stops at the first entry.
        for sql in [&s.stats_oldest, &s.stats_oldest_app] {
            let oldest = plan(sql);
            assert!(
                oldest.contains("INDEX events_app_waiting (app=?)")
                    && !oldest.contains("TEMP B-TREE")
                    && !oldest.contains("SCAN e "),
                "{oldest}"
            );
        }
    }

    #[test]
    fn stored_events_round_trip_handled_and_counts_assemble() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in Dialect::Sqlite.migrations() {
            conn.execute_batch(&sql).unwrap();
        }
        let s = Statements::new(Dialect::Sqlite);
        let id: i64 = conn
            .query_row(
                &s.insert_event,
                rusqlite::params!["k", "x", None::<String>, "{}", "push", 5, 5, "default"],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(id, 1);
        conn.execute(
            "UPDATE events SET handled = ?1",
            [handled_column(&["a".to_owned(), "b\"".to_owned()])],
        )
        .unwrap();
        let e = conn
            .query_row(&s.get_event, [1], |r| event_from_row(r))
            .unwrap();
        assert_eq!(e.handled, ["a", "b\""]);
        assert_eq!(handled_column(&[]), None);
        conn.execute("UPDATE events SET handled = 'nope'", [])
            .unwrap();
        assert!(conn
            .query_row(&s.get_event, [1], |r| event_from_row(r))
            .is_err());

        let row = |app: &str, t: &str, state: &str, n| (app.into(), t.into(), state.into(), n);
        let stats = stats_from(
            [
                row("default", "x", "done", 2),
                row("default", "y", "done", 1),
                row("ops", "x", "done", 4),
                row("ops", "x", "pending", 1),
            ],
            [("default".to_owned(), 10), ("ops".to_owned(), 1)],
            None,
            4,
        );
        assert_eq!(stats.by_state["done"], 7);
        assert_eq!(stats.by_state["dead"], 0);
        assert_eq!(stats.by_type["x"]["done"], 6);
        assert_eq!(
            stats.oldest_pending_age_ms,
            Some(3),
            "the most overdue app's"
        );
        assert_eq!(stats.by_app["default"].by_state["done"], 3);
        assert_eq!(stats.by_app["default"].by_state["pending"], 0);
        assert_eq!(stats.by_app["default"].oldest_pending_age_ms, Some(0));
        assert_eq!(stats.by_app["ops"].by_state["pending"], 1);
        assert_eq!(stats.by_app["ops"].oldest_pending_age_ms, Some(3));
        // Shards: summed signed, and what sums to 0 is as if it had no row.
        let shards = stats_from(
            [
                row("ops", "x", "pending", 2),
                row("ops", "x", "pending", -2),
                row("default", "y", "done", -1),
                row("default", "y", "done", 3),
                row("default", "y", "dead", 1),
                row("default", "y", "dead", -1),
            ],
            [],
            None,
            4,
        );
        assert_eq!(shards.by_state["done"], 2);
        assert_eq!(shards.by_state["pending"], 0);
        assert_eq!(shards.by_type.keys().collect::<Vec<_>>(), ["y"]);
        assert_eq!(shards.by_type["y"].len(), 1, "{shards:?}");
        assert_eq!(shards.by_app.keys().collect::<Vec<_>>(), ["default"]);
        assert_eq!(shards.by_app["default"].by_state["done"], 2);
        let asked = stats_from([], [], Some("quiet"), 4);
        assert_eq!(asked.by_app.keys().collect::<Vec<_>>(), ["quiet"]);
        assert_eq!(asked.by_app["quiet"].by_state, asked.by_state);
        assert_eq!(asked.by_app["quiet"].by_state.len(), 5);
        assert_eq!(asked.oldest_pending_age_ms, None);
    }

    #[test]
    fn a_listing_names_only_the_filters_given() {
        let all = ListQuery::default();
        let (sql, params) = list_events(Dialect::Postgres, &all);
        assert!(
            sql.ends_with("FROM events WHERE 1 = 1 ORDER BY id DESC LIMIT $1"),
            "{sql}"
        );
        assert_eq!(params, vec![Param::Int(100)]);
        let dead = ListQuery {
            app: Some("ops".into()),
            state: Some(EventState::Dead),
            before_id: Some(7),
            limit: Some(50),
            ..ListQuery::default()
        };
        let (sql, params) = list_events(Dialect::Sqlite, &dead);
        assert!(
            sql.ends_with(
                "WHERE 1 = 1 AND app = ?1 AND state = 'dead' AND id < ?2 ORDER BY id DESC LIMIT ?3"
            ),
            "{sql}"
        );
        assert_eq!(
            params,
            vec![Param::Text("ops".into()), Param::Int(7), Param::Int(50)]
        );
        let waiting = ListQuery {
            state: Some(EventState::Pending),
            event_type: Some("x".into()),
            since: Some(5),
            ..ListQuery::default()
        };
        let (sql, _) = list_events(Dialect::Postgres, &waiting);
        assert!(
            sql.contains("state = 'pending' AND state IN ('pending', 'retry') AND event_type = $1 AND received_at >= $2 AND id >= COALESCE((SELECT id FROM events WHERE received_at >= $3 ORDER BY received_at LIMIT 1), 9223372036854775807) ORDER BY id DESC LIMIT $4"),
            "{sql}"
        );
        let running = ListQuery {
            state: Some(EventState::Running),
            ..ListQuery::default()
        };
        assert!(list_events(Dialect::Sqlite, &running)
            .0
            .contains("INDEXED BY events_leased"));
        assert!(!list_events(Dialect::Postgres, &running)
            .0
            .contains("INDEXED"));
    }
}
