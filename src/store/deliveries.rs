//! Deliveries: one row per (event, route), the durable state of carrying an event to a route's
//! destination. Created in the event's own insert transaction, so the fan-out is never lost
//! or doubled; claimed with a lease per route, like events; done only when the destination
//! confirmed.
//!
//! The types and the statements both backends share; each backend runs them in its own
//! transactions ([`super::sqlite`], [`super::postgres`]).

use serde::Serialize;

use super::schema::{Dialect, SqlRow};
use super::EventState;

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDelivery {
    pub id: i64,
    pub event_id: i64,
    pub route: String,
    pub app: String,
    pub state: EventState,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    /// The destination's last status (HTTP), when it gave one.
    pub last_status: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// When the destination confirmed it.
    pub delivered_at: Option<i64>,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Confirmed by the destination.
    Done { status: Option<u16> },
    /// Failed; try again at `at`.
    Retry {
        at: i64,
        error: String,
        status: Option<u16>,
    },
    /// Failed for good (refused, or retries used up).
    Dead { error: String, status: Option<u16> },
}

/// Which deliveries a listing shows, newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub route: Option<String>,
    pub state: Option<EventState>,
    pub event_id: Option<i64>,
    /// Created at or after (epoch ms).
    pub since: Option<i64>,
    pub limit: Option<u32>,
}

/// Which deliveries a replay sends again (back to `pending`, attempts reset; running ones are
/// left alone).
#[derive(Debug, Clone)]
pub enum DeliveryReplay {
    Ids(Vec<i64>),
    /// Every delivery of a route in a state (`dead`, usually).
    RouteState {
        route: String,
        state: EventState,
    },
    /// Every delivery in a state, whatever the route.
    State(EventState),
    /// Created at or after (epoch ms), optionally of one route.
    Since {
        since: i64,
        route: Option<String>,
    },
}

/// A route's deliveries not done, by state, and how long its oldest waiting one has been due.
/// (Done ones are not counted: that would read them all; the metrics count them as they
/// happen.)
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RouteBacklog {
    pub route: String,
    pub pending: u64,
    pub running: u64,
    pub retry: u64,
    pub dead: u64,
    pub oldest_due_age_ms: Option<i64>,
}

/// A paused route: why and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoutePause {
    pub route: String,
    pub reason: String,
    pub paused_at: i64,
}

/// What a delivery row is read as.
pub const DELIVERY_COLUMNS: &str = "id, event_id, route, app, state, attempts, next_attempt_at, \
     last_error, last_status, created_at, updated_at, delivered_at";

pub fn delivery_from_row<R: SqlRow>(row: &R) -> Result<StoredDelivery, R::Error> {
    let state = row.text(4)?;
    Ok(StoredDelivery {
        id: row.int(0)?,
        event_id: row.int(1)?,
        route: row.text(2)?,
        app: row.text(3)?,
        state: EventState::parse(&state)
            .ok_or_else(|| R::invalid(4, format!("unknown delivery state {state:?}")))?,
        attempts: row.int(5)?,
        next_attempt_at: row.int(6)?,
        last_error: row.opt_text(7)?,
        last_status: row.opt_int(8)?,
        created_at: row.int(9)?,
        updated_at: row.int(10)?,
        delivered_at: row.opt_int(11)?,
    })
}

/// The delivery statements, rendered once per store. Parameters are listed beside each.
#[derive(Debug)]
pub struct DeliveryStatements {
    /// event_id, route, app, next_attempt_at, now (created/updated): no row if it exists.
    pub insert: String,
    /// Expired leases of a route first, then its due deliveries:
    /// owner, lease until, now, limit, route → [`DELIVERY_COLUMNS`].
    pub claims: [String; 2],
    /// id, owner, now, status.
    pub done: String,
    /// id, owner, at, error, now, status.
    pub retry: String,
    /// id, owner, error, now, status.
    pub dead: String,
    /// id → [`DELIVERY_COLUMNS`].
    pub get: String,
    /// route or NULL, state or NULL, event id or NULL, since or NULL, limit.
    pub list: String,
    /// now, id.
    pub replay_id: String,
    /// now, route, state.
    pub replay_route_state: String,
    /// now, state.
    pub replay_state: String,
    /// now, since, route or NULL.
    pub replay_since: String,
    /// event_id, route, app, now: created, or reset to pending unless running.
    pub redeliver: String,
    /// owner, now: a stopping runner's leases back to pending.
    pub release: String,
    /// → route, state, count, for the states other than `done`.
    pub counts: String,
    /// → route, oldest due time among waiting deliveries.
    pub oldest_due: String,
    /// route, reason, now.
    pub pause: String,
    /// route.
    pub resume: String,
    /// → route, reason, paused_at.
    pub pauses: String,
}

/// What a claim sets, then the selection of ids (in each dialect's words).
const CLAIM_SET: &str = "UPDATE deliveries SET state = 'running', lease_owner = $1, \
     lease_until = $2, attempts = attempts + 1, updated_at = $3 WHERE id IN ";

const REPLAY_SET: &str = "UPDATE deliveries SET state = 'pending', attempts = 0, \
     next_attempt_at = $1, lease_owner = NULL, lease_until = NULL, updated_at = $1 \
     WHERE state <> 'running' AND ";

impl DeliveryStatements {
    pub fn new(d: Dialect) -> Self {
        let lock = match d {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let claim = |select: &str| {
            d.statement(&format!(
                "{CLAIM_SET} ({select}{lock}) RETURNING {DELIVERY_COLUMNS}"
            ))
        };
        let finish = |set: &str| {
            d.statement(&format!(
                "UPDATE deliveries SET {set}, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2"
            ))
        };
        DeliveryStatements {
            insert: d.statement(
                "INSERT INTO deliveries (event_id, route, app, next_attempt_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (event_id, route) DO NOTHING",
            ),
            claims: [
                claim(
                    "SELECT id FROM deliveries WHERE route = $5 AND state = 'running' \
                     AND lease_until < $3 ORDER BY lease_until LIMIT $4",
                ),
                claim(
                    "SELECT id FROM deliveries WHERE route = $5 AND state IN ('pending', 'retry') \
                     AND next_attempt_at <= $3 ORDER BY next_attempt_at, id LIMIT $4",
                ),
            ],
            done: finish(
                "state = 'done', updated_at = $3, delivered_at = $3, last_status = $4, \
                 last_error = NULL",
            ),
            retry: finish(
                "state = 'retry', next_attempt_at = $3, last_error = $4, updated_at = $5, \
                 last_status = $6",
            ),
            dead: finish("state = 'dead', last_error = $3, updated_at = $4, last_status = $5"),
            get: d.statement(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1"
            )),
            list: d.statement(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries \
                 WHERE (CAST($1 AS TEXT) IS NULL OR route = $1) \
                 AND (CAST($2 AS TEXT) IS NULL OR state = $2) \
                 AND (CAST($3 AS BIGINT) IS NULL OR event_id = $3) \
                 AND (CAST($4 AS BIGINT) IS NULL OR created_at >= $4) \
                 ORDER BY id DESC LIMIT $5"
            )),
            redeliver: d.statement(
                "INSERT INTO deliveries (event_id, route, app, next_attempt_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4, $4) ON CONFLICT (event_id, route) DO UPDATE SET \
                 state = 'pending', attempts = 0, next_attempt_at = EXCLUDED.next_attempt_at, \
                 lease_owner = NULL, lease_until = NULL, updated_at = EXCLUDED.updated_at \
                 WHERE deliveries.state <> 'running'",
            ),
            replay_id: d.statement(&format!("{REPLAY_SET} id = $2")),
            replay_route_state: d.statement(&format!("{REPLAY_SET} route = $2 AND state = $3")),
            replay_state: d.statement(&format!("{REPLAY_SET} state = $2")),
            replay_since: d.statement(&format!(
                "{REPLAY_SET} created_at >= $2 AND (CAST($3 AS TEXT) IS NULL OR route = $3)"
            )),
            release: d.statement(
                "UPDATE deliveries SET state = 'pending', attempts = CASE WHEN attempts > 0 \
                 THEN attempts - 1 ELSE 0 END, lease_owner = NULL, lease_until = NULL, \
                 updated_at = $2 WHERE state = 'running' AND lease_owner = $1",
            ),
            // Each part walks a partial index: the done deliveries (nearly all) are not read.
            counts: d.statement(
                "SELECT route, state, COUNT(*) FROM deliveries \
                 WHERE state IN ('pending', 'retry') GROUP BY route, state \
                 UNION ALL SELECT route, 'running', COUNT(*) FROM deliveries \
                 WHERE state = 'running' GROUP BY route \
                 UNION ALL SELECT route, 'dead', COUNT(*) FROM deliveries \
                 WHERE state = 'dead' GROUP BY route",
            ),
            oldest_due: d.statement(
                "SELECT route, MIN(next_attempt_at) FROM deliveries \
                 WHERE state IN ('pending', 'retry') GROUP BY route",
            ),
            pause: d.statement(
                "INSERT INTO route_pauses (route, reason, paused_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (route) DO UPDATE SET reason = EXCLUDED.reason, \
                 paused_at = EXCLUDED.paused_at",
            ),
            resume: d.statement("DELETE FROM route_pauses WHERE route = $1"),
            pauses: d.statement("SELECT route, reason, paused_at FROM route_pauses ORDER BY route"),
        }
    }
}

/// The routes' backlogs from the `counts` and `oldest_due` rows.
pub fn backlogs(
    counts: Vec<(String, String, i64)>,
    oldest: Vec<(String, Option<i64>)>,
    now_ms: i64,
) -> Vec<RouteBacklog> {
    let mut by_route: std::collections::BTreeMap<String, RouteBacklog> = Default::default();
    for (route, state, n) in counts {
        let entry = by_route
            .entry(route.clone())
            .or_insert_with(|| RouteBacklog {
                route,
                ..Default::default()
            });
        let n = u64::try_from(n).unwrap_or(0);
        match state.as_str() {
            "pending" => entry.pending += n,
            "running" => entry.running += n,
            "retry" => entry.retry += n,
            "dead" => entry.dead += n,
            _ => {}
        }
    }
    for (route, due) in oldest {
        if let (Some(entry), Some(due)) = (by_route.get_mut(&route), due) {
            entry.oldest_due_age_ms = Some(now_ms.saturating_sub(due).max(0));
        }
    }
    by_route.into_values().collect()
}
