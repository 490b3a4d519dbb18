//! Prometheus metrics. Every observable happening is one method here, so names and labels
//! live in one place (listed in the README).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;

use crate::store::{EventState, Stats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeOutcome {
    app: String,
    event_type: String,
    outcome: &'static str,
}

/// A reason of one app's (callbacks refused, notifications skipped).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppReason {
    app: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// One app's events in one state (the queue gauges).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppState {
    app: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct App {
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pruned {
    app: String,
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Name {
    app: String,
    name: &'static str,
}

/// The `name` labels of `dinghook_dingtalk`, in the order [`Metrics::set_quota`] gives the
/// values.
const DINGTALK_FIGURES: [&str; 12] = [
    "calls_this_month",
    "monthly_quota",
    "quota_remaining",
    "quota_used_ratio",
    "requests_sent",
    "throttled_retries",
    "busy_retries",
    "quota_rejections",
    "ip_bans",
    "disabled_answers",
    "token_fetches",
    "quota_warnings",
];

/// All of dinghook's metrics.
pub struct Metrics {
    registry: Registry,
    events_received: Family<TypeOutcome, Counter>,
    callbacks_rejected: Family<AppReason, Counter>,
    ack_seconds: Histogram,
    handler_runs: Family<TypeOutcome, Counter>,
    /// Rows deleted by retention, by app and what (`done`, `dead`, `effect`, `audit`, …).
    pruned: Family<Pruned, Counter>,
    dead_letters: Counter,
    queue_depth: Family<AppState, Gauge>,
    oldest_pending_seconds: Family<App, Gauge<f64, AtomicU64>>,
    /// The apps whose queue gauges have been shown. Once shown, an app's gauges stay, at 0
    /// when its events are gone, so a drained queue reads 0 rather than "no data". A std
    /// mutex: held only while the gauges are set, never across an await.
    queue_apps: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// What the API's app health shows that counters cannot.
    recent: Recent,
    store_up: Gauge,
    dingtalk: Family<Name, Gauge<f64, AtomicU64>>,
    notifications_sent: Family<Kind, Counter>,
    notifications_skipped: Family<AppReason, Counter>,
    recipients_undelivered: Counter,
    recovered_events: Family<Outcome, Counter>,
    recovery_runs: Family<Outcome, Counter>,
    /// The event types given a label of their own so far (see [`Metrics::type_label`]). A std
    /// mutex: held only to look up and insert a short string, never across an await.
    type_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    connections: ConnectionMetrics,
    reloads: ReloadMetrics,
    routes: RouteMetrics,
    stream: StreamMetrics,
}

/// What each app's Stream client ([`crate::sources::stream`]) reports.
struct StreamMetrics {
    connected: Family<App, Gauge>,
    reconnects: Family<AppReason, Counter>,
    frames: Family<FrameType, Counter>,
    bad_frames: Family<AppReason, Counter>,
    acks: Family<AckStatus, Counter>,
    redeliveries: Family<App, Counter>,
    ack_seconds: Family<App, Histogram>,
    /// Per app: what `GET /api/v1/apps/{app}` shows. A std mutex, never held across an await.
    status: std::sync::Mutex<HashMap<String, StreamStatus>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameType {
    app: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckStatus {
    app: String,
    status: &'static str,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct StreamStatus {
    state: &'static str,
    /// When the connection entered `state` (epoch ms).
    since: Option<i64>,
    connected_since: Option<i64>,
    /// While not connected: since when (the first attempt, or the loss of the last
    /// connection), however many attempts and back-offs followed.
    down_since: Option<i64>,
    last_frame_at: Option<i64>,
    reconnects: u64,
    last_close_reason: Option<String>,
    last_close_detail: Option<String>,
    last_close_at: Option<i64>,
}

impl StreamMetrics {
    fn register(registry: &mut Registry) -> Self {
        let connected = Family::<App, Gauge>::default();
        registry.register(
            "stream_connected",
            "1 while the app's Stream connection is open (0 connecting, backing off or stopped)",
            connected.clone(),
        );
        let reconnects = Family::<AppReason, Counter>::default();
        registry.register(
            "stream_reconnects",
            "Stream connections ended or failed to open, by reason (disconnect, closed, closed_by_server, read_error, write_error, watchdog, auth_failed, open_failed, connect_failed, open_timeout)",
            reconnects.clone(),
        );
        let frames = Family::<FrameType, Counter>::default();
        registry.register(
            "stream_frames",
            "Stream frames received, by type (event, callback_robot, callback_other, system_ping, system_disconnect, system_other, bad)",
            frames.clone(),
        );
        let bad_frames = Family::<AppReason, Counter>::default();
        registry.register(
            "stream_bad_frames",
            "Stream frames that could not be read as they should, by reason",
            bad_frames.clone(),
        );
        let acks = Family::<AckStatus, Counter>::default();
        registry.register(
            "stream_acks",
            "Stream acknowledgements sent, by status (SUCCESS only after the commit, LATER, callback, callback_error, pong, system, discarded)",
            acks.clone(),
        );
        let redeliveries = Family::<App, Counter>::default();
        registry.register(
            "stream_redeliveries",
            "Stream events already stored (redeliveries, duplicates, or seen by push first), acknowledged again",
            redeliveries.clone(),
        );
        let ack_seconds = Family::<App, Histogram>::new_with_constructor(|| {
            Histogram::new(
                [
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]
                .into_iter(),
            )
        });
        registry.register(
            "stream_ack_duration_seconds",
            "From an EVENT or robot frame's arrival to its acknowledgement (after the commit)",
            ack_seconds.clone(),
        );
        StreamMetrics {
            connected,
            reconnects,
            frames,
            bad_frames,
            acks,
            redeliveries,
            ack_seconds,
            status: std::sync::Mutex::default(),
        }
    }

    fn with<R>(&self, app: &str, f: impl FnOnce(&mut StreamStatus) -> R) -> R {
        let mut all = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(all.entry(app.to_owned()).or_default())
    }
}

/// What the routes' runners ([`crate::routes::runner`]) and scrapes report.
struct RouteMetrics {
    /// 1 while the route's destination was last reached, 0 after it was not.
    up: Family<RouteLabel, Gauge>,
    /// What each route's destination last said, for `/readyz`.
    health: std::sync::Mutex<std::collections::BTreeMap<String, RouteHealth>>,
    deliveries: Family<RouteOutcome, Counter>,
    latency: Family<RouteLabel, Histogram>,
    backlog: Family<RouteState, Gauge>,
    oldest_due: Family<RouteLabel, Gauge<f64, AtomicU64>>,
    paused: Family<RouteLabel, Gauge>,
}

/// What `/readyz` shows of a route: whether its destination was reached the last time it
/// was tried (a delivery or the check at start), since when, and the last failure.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct RouteHealth {
    up: bool,
    /// Epoch ms since `up` has been what it is.
    since: i64,
    last_ok_at: Option<i64>,
    last_error: Option<String>,
    last_error_at: Option<i64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcome {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteState {
    route: String,
    state: &'static str,
}

impl RouteMetrics {
    fn register(registry: &mut Registry) -> Self {
        let up = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_up",
            "1 while the route's destination was reached the last time it was tried (a delivery, or the check at start), 0 after it was not",
            up.clone(),
        );
        let deliveries = Family::<RouteOutcome, Counter>::default();
        registry.register(
            "route_deliveries",
            "Delivery attempts by route and outcome (done, retry, dead, gone)",
            deliveries.clone(),
        );
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(
                [
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 3600.0,
                ]
                .into_iter(),
            )
        });
        registry.register(
            "route_delivery_seconds",
            "From the event's acknowledgement to the destination's confirmation",
            latency.clone(),
        );
        let backlog = Family::<RouteState, Gauge>::default();
        registry.register(
            "route_backlog",
            "Deliveries not done, by route and state (read at scrape)",
            backlog.clone(),
        );
        let oldest_due = Family::<RouteLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "route_oldest_due_age_seconds",
            "How long the route's most overdue waiting delivery has been due",
            oldest_due.clone(),
        );
        let paused = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_paused",
            "1 while the route is paused (by hand, 410 Gone or its circuit breaker)",
            paused.clone(),
        );
        RouteMetrics {
            up,
            health: std::sync::Mutex::default(),
            deliveries,
            latency,
            backlog,
            oldest_due,
            paused,
        }
    }
}

/// What configuration reloads ([`crate::app::Reloader`]) report.
struct ReloadMetrics {
    reloads: Family<ReloadResult, Counter>,
    apps: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

impl ReloadMetrics {
    fn register(registry: &mut Registry) -> Self {
        let reloads = Family::<ReloadResult, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (ok, refused)",
            reloads.clone(),
        );
        let apps = Gauge::default();
        registry.register("apps", "DingTalk apps configured", apps.clone());
        ReloadMetrics { reloads, apps }
    }
}

/// What the accept loop ([`crate::server`]) reports.
struct ConnectionMetrics {
    open: Gauge,
    refused: Family<Reason, Counter>,
    evicted: Family<Reason, Counter>,
    accept_errors: Counter,
}

impl ConnectionMetrics {
    fn register(registry: &mut Registry) -> Self {
        let open = Gauge::default();
        registry.register(
            "connections_open",
            "Open HTTP connections, all listeners",
            open.clone(),
        );
        let refused = Family::<Reason, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed on accept because a cap was reached with every connection busy, by cap (per_client, total)",
            refused.clone(),
        );
        let evicted = Family::<Reason, Counter>::default();
        registry.register(
            "connections_evicted",
            "Idle or slow connections closed to make room for a new one, by cap (per_client, total)",
            evicted.clone(),
        );
        let accept_errors = Counter::default();
        registry.register(
            "accept_errors",
            "Failed accepts on a listener (e.g. out of file descriptors)",
            accept_errors.clone(),
        );
        ConnectionMetrics {
            open,
            refused,
            evicted,
            accept_errors,
        }
    }
}

/// At most this many event types get a label of their own; the rest count as `other`. An
/// event type is whatever a signed request says, so without a bound `/metrics` grows with
/// every new type (the hostile-clients report saw 20 000 types make it 11 MB).
pub const MAX_EVENT_TYPE_LABELS: usize = 100;

/// The label for every event type beyond [`MAX_EVENT_TYPE_LABELS`] or not written like one.
pub const OTHER_EVENT_TYPE: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    app: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    app: String,
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dinghook");
        let events_received = Family::<TypeOutcome, Counter>::default();
        registry.register(
            "events_received",
            "Callbacks accepted, by event type and outcome (stored, duplicate, check)",
            events_received.clone(),
        );
        let callbacks_rejected = Family::<AppReason, Counter>::default();
        registry.register(
            "callbacks_rejected",
            "Callbacks refused, by error code",
            callbacks_rejected.clone(),
        );
        let ack_seconds = Histogram::new(
            [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]
            .into_iter(),
        );
        registry.register(
            "ack_duration_seconds",
            "Time from request to acknowledgement of accepted callbacks",
            ack_seconds.clone(),
        );
        let handler_runs = Family::<TypeOutcome, Counter>::default();
        registry.register(
            "handler_runs",
            "Dispatcher runs, by event type and outcome (done, retry, dead, no_handler, lease_lost)",
            handler_runs.clone(),
        );
        let pruned = Family::<Pruned, Counter>::default();
        registry.register(
            "pruned",
            "Rows deleted by retention, by app and what (done and dead events with their runs and deliveries, effect, audit and console_session documents)",
            pruned.clone(),
        );
        let dead_letters = Counter::default();
        registry.register(
            "dead_letters",
            "Events that became dead (retries used up or a permanent failure)",
            dead_letters.clone(),
        );
        let queue_depth = Family::<AppState, Gauge>::default();
        registry.register(
            "queue_depth",
            "Stored events by app and state, read at scrape time",
            queue_depth.clone(),
        );
        let oldest_pending_seconds = Family::<App, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "oldest_pending_age_seconds",
            "How long each app's most overdue event waiting to run (pending or retry) has been due",
            oldest_pending_seconds.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 if the store answered the last scrape's query",
            store_up.clone(),
        );
        let dingtalk = Family::<Name, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "dingtalk",
            "DingTalk API client figures: calls this month, quota, remaining, throttled retries, quota rejections",
            dingtalk.clone(),
        );
        let notifications_sent = Family::<Kind, Counter>::default();
        registry.register(
            "notifications_sent",
            "Work notifications and group messages sent by the built-in handlers, by kind",
            notifications_sent.clone(),
        );
        let notifications_skipped = Family::<AppReason, Counter>::default();
        registry.register(
            "notifications_skipped",
            "Notifications not sent, by reason (quota_reserve, quota_exhausted, group_not_installed)",
            notifications_skipped.clone(),
        );
        let recipients_undelivered = Counter::default();
        registry.register(
            "notification_recipients_undelivered",
            "Recipients DingTalk reported as failed, forbidden or invalid in send-result checks",
            recipients_undelivered.clone(),
        );
        let recovered_events = Family::<Outcome, Counter>::default();
        registry.register(
            "recovered_events",
            "Entries read from DingTalk's failed-push list, by outcome (stored, duplicate, lost)",
            recovered_events.clone(),
        );
        let recovery_runs = Family::<Outcome, Counter>::default();
        registry.register(
            "recovery_runs",
            "Failed-push recovery cycles, by outcome (ok, not_leader, dingtalk_error, store_error, leadership_lost)",
            recovery_runs.clone(),
        );
        let connections = ConnectionMetrics::register(&mut registry);
        let reloads = ReloadMetrics::register(&mut registry);
        let routes = RouteMetrics::register(&mut registry);
        let stream = StreamMetrics::register(&mut registry);
        Metrics {
            stream,
            connections,
            reloads,
            routes,
            notifications_sent,
            notifications_skipped,
            recipients_undelivered,
            recovered_events,
            recovery_runs,
            registry,
            events_received,
            callbacks_rejected,
            ack_seconds,
            handler_runs,
            pruned,
            dead_letters,
            queue_depth,
            oldest_pending_seconds,
            queue_apps: std::sync::Mutex::default(),
            recent: Recent::default(),
            store_up,
            dingtalk,
            type_labels: std::sync::Mutex::default(),
        }
    }

    /// The `event_type` label for `event_type`: the type itself when it is written like one
    /// (letters, digits, `_ . -`, at most 64) and is among the first
    /// [`MAX_EVENT_TYPE_LABELS`] seen, else `other`. So a forged type can neither break the
    /// exposition (no quote, backslash or newline reaches it) nor grow it without end.
    fn type_label(&self, event_type: &str) -> String {
        let well_formed = !event_type.is_empty()
            && event_type.len() <= 64
            && event_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !well_formed || event_type == OTHER_EVENT_TYPE {
            return OTHER_EVENT_TYPE.to_owned();
        }
        let mut seen = self
            .type_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(event_type) {
            return event_type.to_owned();
        }
        if seen.len() < MAX_EVENT_TYPE_LABELS {
            seen.insert(event_type.to_owned());
            return event_type.to_owned();
        }
        OTHER_EVENT_TYPE.to_owned()
    }

    pub fn set_connections_open(&self, n: usize) {
        self.connections
            .open
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections
            .refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn connection_evicted(&self, reason: &'static str) {
        self.connections
            .evicted
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// A delivery attempt of `route` ended with `outcome`; `seconds`: from the event's
    /// acknowledgement to the confirmation, when done.
    pub fn route_delivery(&self, route: &str, outcome: &'static str, seconds: Option<f64>) {
        self.routes
            .deliveries
            .get_or_create(&RouteOutcome {
                route: route.to_owned(),
                outcome,
            })
            .inc();
        if let Some(seconds) = seconds {
            self.routes
                .latency
                .get_or_create(&RouteLabel {
                    route: route.to_owned(),
                })
                .observe(seconds);
        }
    }

    /// The routes' backlogs and pauses, read at scrape (`routes`: every configured route, so
    /// one with nothing waiting shows zeros).
    pub fn set_routes(
        &self,
        routes: &[String],
        backlogs: &[crate::store::RouteBacklog],
        paused: &[String],
    ) {
        for route in routes {
            let b = backlogs.iter().find(|b| &b.route == route);
            for (state, n) in [
                ("pending", b.map_or(0, |b| b.pending)),
                ("running", b.map_or(0, |b| b.running)),
                ("retry", b.map_or(0, |b| b.retry)),
                ("dead", b.map_or(0, |b| b.dead)),
            ] {
                self.routes
                    .backlog
                    .get_or_create(&RouteState {
                        route: route.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let label = RouteLabel {
                route: route.clone(),
            };
            let age = b.and_then(|b| b.oldest_due_age_ms).unwrap_or(0);
            self.routes
                .oldest_due
                .get_or_create(&label)
                .set(age as f64 / 1000.0);
            self.routes
                .paused
                .get_or_create(&label)
                .set(i64::from(paused.contains(route)));
        }
    }

    /// A configuration reload ended (`ok` or `refused`).
    pub fn config_reload(&self, result: &'static str) {
        self.reloads
            .reloads
            .get_or_create(&ReloadResult { result })
            .inc();
    }

    /// How many apps the running configuration has.
    pub fn set_apps(&self, n: usize) {
        self.reloads.apps.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn accept_error(&self) {
        self.connections.accept_errors.inc();
    }

    pub fn event_received(&self, app: &str, event_type: &str, outcome: &'static str, seconds: f64) {
        self.events_received
            .get_or_create(&TypeOutcome {
                app: app.to_owned(),
                event_type: self.type_label(event_type),
                outcome,
            })
            .inc();
        self.ack_seconds.observe(seconds);
        self.recent.received(app, crate::time::now_millis());
    }

    pub fn callback_rejected(&self, app: &str, reason: &'static str) {
        self.callbacks_rejected
            .get_or_create(&AppReason {
                app: app.to_owned(),
                reason,
            })
            .inc();
        self.recent.refused(app, reason, crate::time::now_millis());
    }

    /// `app`'s callbacks refused in the last hour, by reason (counted per minute).
    pub fn refusals_last_hour(&self, app: &str) -> BTreeMap<String, u64> {
        self.recent.refusals(app, crate::time::now_millis())
    }

    /// `app`'s callbacks received and refused in each of the last [`RECENT_MINUTES`] minutes,
    /// oldest first, the current minute last (what the console's charts draw).
    pub fn callbacks_per_minute(&self, app: &str) -> (Vec<u64>, Vec<u64>) {
        self.recent.per_minute(app, crate::time::now_millis())
    }

    /// When `app`'s last recovery cycle ended (epoch ms) and how, since this process started.
    pub fn last_recovery_run(&self, app: &str) -> Option<(i64, &'static str)> {
        self.recent.last_recovery(app)
    }

    pub fn handler_run(&self, app: &str, event_type: &str, outcome: &'static str) {
        self.handler_runs
            .get_or_create(&TypeOutcome {
                app: app.to_owned(),
                event_type: self.type_label(event_type),
                outcome,
            })
            .inc();
        if outcome == "dead" {
            self.dead_letters.inc();
        }
    }

    pub fn notification_sent(&self, app: &str, kind: &str) {
        self.notifications_sent
            .get_or_create(&Kind {
                app: app.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn notification_skipped(&self, app: &str, reason: &'static str) {
        self.notifications_skipped
            .get_or_create(&AppReason {
                app: app.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn notification_undelivered(&self, recipients: u64) {
        self.recipients_undelivered.inc_by(recipients);
    }

    /// Sets one app's DingTalk client figures from its quota status and counters.
    pub fn set_quota(
        &self,
        app: &str,
        quota: &crate::dingtalk::QuotaStatus,
        stats: &crate::dingtalk::ClientStats,
    ) {
        let limit = quota.limit as f64;
        // In the order of DINGTALK_FIGURES, which names them.
        let values: [f64; DINGTALK_FIGURES.len()] = [
            quota.used as f64,
            limit,
            quota.remaining as f64,
            if limit > 0.0 {
                quota.used as f64 / limit
            } else {
                0.0
            },
            stats.requests_sent as f64,
            stats.throttled_retries as f64,
            stats.busy_retries as f64,
            stats.quota_rejections as f64,
            stats.ip_bans as f64,
            stats.disabled_answers as f64,
            stats.token_fetches as f64,
            stats.quota_warnings as f64,
        ];
        let figures = DINGTALK_FIGURES.into_iter().zip(values);
        for (name, value) in figures {
            self.dingtalk
                .get_or_create(&Name {
                    app: app.to_owned(),
                    name,
                })
                .set(value);
        }
    }

    /// Drops the DingTalk client series of `app` (its client is gone: the app was removed by a
    /// reload, or lost its app key), so `/metrics` does not show stale figures for it.
    pub fn forget_client(&self, app: &str) {
        for name in DINGTALK_FIGURES {
            self.dingtalk.remove(&Name {
                app: app.to_owned(),
                name,
            });
        }
    }

    /// Updates the queue gauges from fresh store statistics of every app (`None`: the store
    /// did not answer, and the gauges keep their last values).
    pub fn set_queue(&self, stats: Option<&Stats>) {
        let Some(stats) = stats else {
            self.store_up.set(0);
            return;
        };
        self.store_up.set(1);
        let mut shown = self
            .queue_apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shown.extend(stats.by_app.keys().cloned());
        for app in shown.iter() {
            let figures = stats.by_app.get(app);
            for state in EventState::ALL {
                let n = figures
                    .and_then(|f| f.by_state.get(state.as_str()))
                    .copied()
                    .unwrap_or(0);
                self.queue_depth
                    .get_or_create(&AppState {
                        app: app.clone(),
                        state: state.as_str(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let oldest_ms = figures.and_then(|f| f.oldest_pending_age_ms).unwrap_or(0);
            self.oldest_pending_seconds
                .get_or_create(&App { app: app.clone() })
                .set(oldest_ms as f64 / 1000.0);
        }
    }

    /// One entry of the failed-push list: `stored`, `duplicate`, or `lost` (read, but the store
    /// failed; DingTalk no longer has it).
    pub fn recovered_event(&self, app: &str, outcome: &'static str) {
        self.recovered_events
            .get_or_create(&Outcome {
                app: app.to_owned(),
                outcome,
            })
            .inc();
    }

    /// One recovery cycle of `app` and how it ended.
    pub fn recovery_run(&self, app: &str, outcome: &'static str) {
        self.recovery_runs
            .get_or_create(&Outcome {
                app: app.to_owned(),
                outcome,
            })
            .inc();
        self.recent
            .recovered(app, outcome, crate::time::now_millis());
    }

    /// `app`'s Stream connection is now `state` (connecting, connected, backoff, stopping,
    /// stopped).
    pub fn stream_state(&self, app: &str, state: &'static str) {
        let label = App {
            app: app.to_owned(),
        };
        self.stream
            .connected
            .get_or_create(&label)
            .set(i64::from(state == "connected"));
        let now = crate::time::now_millis();
        self.stream.with(app, |s| {
            if state == "connected" {
                s.connected_since = Some(now);
                s.down_since = None;
            } else if matches!(state, "stopping" | "stopped") {
                // Turned off on purpose: not down. A client started again counts afresh.
                s.connected_since = None;
                s.down_since = None;
            } else {
                if s.state == "connected" {
                    s.connected_since = None;
                }
                if s.down_since.is_none() {
                    s.down_since = Some(now);
                }
            }
            if s.state != state {
                s.since = Some(now);
            }
            s.state = state;
        });
    }

    /// One of `app`'s Stream connections ended or could not be opened, and why.
    pub fn stream_reconnect(&self, app: &str, reason: &'static str, detail: &str) {
        self.stream
            .reconnects
            .get_or_create(&AppReason {
                app: app.to_owned(),
                reason,
            })
            .inc();
        let now = crate::time::now_millis();
        self.stream.with(app, |s| {
            s.reconnects += 1;
            s.last_close_reason = Some(reason.to_owned());
            s.last_close_detail = Some(detail.chars().take(200).collect());
            s.last_close_at = Some(now);
        });
    }

    /// A text frame arrived on `app`'s Stream connection (for its status).
    pub fn stream_frame_seen(&self, app: &str) {
        let now = crate::time::now_millis();
        self.stream.with(app, |s| s.last_frame_at = Some(now));
    }

    /// A Stream frame of `kind` arrived for `app`.
    pub fn stream_frame(&self, app: &str, kind: &'static str) {
        self.stream
            .frames
            .get_or_create(&FrameType {
                app: app.to_owned(),
                r#type: kind,
            })
            .inc();
    }

    /// A Stream frame of `app` that could not be read as it should (`reason`).
    pub fn stream_bad_frame(&self, app: &str, reason: &'static str) {
        self.stream
            .bad_frames
            .get_or_create(&AppReason {
                app: app.to_owned(),
                reason,
            })
            .inc();
    }

    /// An acknowledgement sent on `app`'s Stream connection; `seconds` from the frame's
    /// arrival, for events and robot messages.
    pub fn stream_ack(&self, app: &str, status: &'static str, seconds: Option<f64>) {
        self.stream
            .acks
            .get_or_create(&AckStatus {
                app: app.to_owned(),
                status,
            })
            .inc();
        if let Some(seconds) = seconds {
            self.stream
                .ack_seconds
                .get_or_create(&App {
                    app: app.to_owned(),
                })
                .observe(seconds);
        }
    }

    /// Retention deleted `n` rows of `what` of `app`.
    pub fn pruned(&self, app: &str, what: &'static str, n: u64) {
        if n > 0 {
            self.pruned
                .get_or_create(&Pruned {
                    app: app.to_owned(),
                    what,
                })
                .inc_by(n);
        }
    }

    /// A Stream event of `app` that was already stored (acknowledged again, not stored twice).
    pub fn stream_redelivery(&self, app: &str) {
        self.stream
            .redeliveries
            .get_or_create(&App {
                app: app.to_owned(),
            })
            .inc();
    }

    /// `app`'s Stream connection as the HTTP API shows it (`state`, `connected_since`,
    /// `last_frame_at`, `reconnects`, `last_close_reason`, …), or `None` when the app has no
    /// Stream client in this process.
    pub fn stream_status(&self, app: &str) -> Option<serde_json::Value> {
        let all = self
            .stream
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.get(app).and_then(|s| serde_json::to_value(s).ok())
    }

    /// Route `route`'s destination was reached (`Ok`) or not (`Err` with why: a text without
    /// secrets, as the destinations write their errors).
    pub fn route_reached(&self, route: &str, result: Result<(), &str>) {
        let now = crate::time::now_millis();
        let up = result.is_ok();
        self.routes
            .up
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .set(i64::from(up));
        let mut all = self
            .routes
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let health = all.entry(route.to_owned()).or_insert_with(|| RouteHealth {
            up,
            since: now,
            ..RouteHealth::default()
        });
        if health.up != up {
            health.up = up;
            health.since = now;
        }
        match result {
            Ok(()) => health.last_ok_at = Some(now),
            Err(error) => {
                health.last_error = Some(error.to_owned());
                health.last_error_at = Some(now);
            }
        }
    }

    /// Each route tried so far in this process: `up`, `since`, `last_ok_at`, `last_error`,
    /// `last_error_at`, by route name.
    pub fn route_statuses(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let all = self
            .routes
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter()
            .filter_map(|(route, h)| Some((route.clone(), serde_json::to_value(h).ok()?)))
            .collect()
    }

    /// Every app's Stream connection that runs in this process (not `stopped`), as
    /// [`Metrics::stream_status`] shows it, by app name.
    pub fn stream_statuses(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let all = self
            .stream
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter()
            .filter(|(_, s)| s.state != "stopped")
            .filter_map(|(app, s)| Some((app.clone(), serde_json::to_value(s).ok()?)))
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_client_leaves_no_dingtalk_series() {
        let metrics = Metrics::new();
        let quota = crate::dingtalk::QuotaStatus {
            month: "2026-11".into(),
            used: 1,
            limit: 5000,
            remaining: 4999,
        };
        let stats = crate::dingtalk::ClientStats::default();
        metrics.set_quota("ops", &quota, &stats);
        metrics.set_quota("other", &quota, &stats);
        let text = metrics.render();
        for name in DINGTALK_FIGURES {
            assert!(
                text.contains(&format!("dinghook_dingtalk{{app=\"ops\",name=\"{name}\"}}")),
                "{name} in:\n{text}"
            );
        }
        // Each value under its own name.
        for (name, value) in [
            ("calls_this_month", "1.0"),
            ("monthly_quota", "5000.0"),
            ("quota_remaining", "4999.0"),
            ("quota_used_ratio", "0.0002"),
            ("requests_sent", "0.0"),
        ] {
            let line = format!("dinghook_dingtalk{{app=\"ops\",name=\"{name}\"}} {value}");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
        metrics.forget_client("ops");
        let text = metrics.render();
        assert!(!text.contains("app=\"ops\""), "{text}");
        assert!(text.contains("app=\"other\""), "{text}");
    }
}

/// Per app: callbacks received, and refusals by reason, in one-minute buckets over the last
/// hour, and the last recovery cycle. Bounded: at most [`RECENT_MINUTES`] buckets of a few reasons per app, and
/// only apps that had a refusal or a recovery run. A std mutex, never held across an await.
#[derive(Default)]
struct Recent {
    apps: std::sync::Mutex<HashMap<String, AppRecent>>,
}

/// The minutes [`Recent`] keeps.
const RECENT_MINUTES: i64 = 60;

#[derive(Default)]
struct AppRecent {
    /// (minute since the epoch, reason → count), oldest first.
    refusals: std::collections::VecDeque<(i64, BTreeMap<&'static str, u64>)>,
    /// (minute since the epoch, callbacks received), oldest first.
    received: std::collections::VecDeque<(i64, u64)>,
    last_recovery: Option<(i64, &'static str)>,
}

impl Recent {
    fn with<R>(&self, app: &str, f: impl FnOnce(&mut AppRecent) -> R) -> R {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match apps.get_mut(app) {
            Some(recent) => f(recent),
            None => f(apps.entry(app.to_owned()).or_default()),
        }
    }

    fn refused(&self, app: &str, reason: &'static str, now_ms: i64) {
        let minute = now_ms.div_euclid(60_000);
        self.with(app, |recent| {
            while recent
                .refusals
                .front()
                .is_some_and(|(m, _)| *m <= minute - RECENT_MINUTES)
            {
                recent.refusals.pop_front();
            }
            match recent.refusals.back_mut() {
                Some((m, counts)) if *m == minute => *counts.entry(reason).or_default() += 1,
                _ => recent
                    .refusals
                    .push_back((minute, BTreeMap::from([(reason, 1)]))),
            }
        });
    }

    fn received(&self, app: &str, now_ms: i64) {
        let minute = now_ms.div_euclid(60_000);
        self.with(app, |recent| {
            while recent
                .received
                .front()
                .is_some_and(|(m, _)| *m <= minute - RECENT_MINUTES)
            {
                recent.received.pop_front();
            }
            match recent.received.back_mut() {
                Some((m, n)) if *m == minute => *n += 1,
                _ => recent.received.push_back((minute, 1)),
            }
        });
    }

    fn per_minute(&self, app: &str, now_ms: i64) -> (Vec<u64>, Vec<u64>) {
        let minute = now_ms.div_euclid(60_000);
        let first = minute - RECENT_MINUTES + 1;
        let slot = |m: i64| {
            usize::try_from(m - first)
                .ok()
                .filter(|i| *i < RECENT_MINUTES as usize)
        };
        let mut received = vec![0; RECENT_MINUTES as usize];
        let mut refused = vec![0; RECENT_MINUTES as usize];
        let apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(recent) = apps.get(app) {
            for (m, n) in &recent.received {
                if let Some(i) = slot(*m) {
                    received[i] += n;
                }
            }
            for (m, counts) in &recent.refusals {
                if let Some(i) = slot(*m) {
                    refused[i] += counts.values().sum::<u64>();
                }
            }
        }
        (received, refused)
    }

    fn refusals(&self, app: &str, now_ms: i64) -> BTreeMap<String, u64> {
        let minute = now_ms.div_euclid(60_000);
        let apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut total = BTreeMap::new();
        if let Some(recent) = apps.get(app) {
            for (_, counts) in recent
                .refusals
                .iter()
                .filter(|(m, _)| *m > minute - RECENT_MINUTES)
            {
                for (reason, n) in counts {
                    *total.entry((*reason).to_owned()).or_default() += n;
                }
            }
        }
        total
    }

    fn recovered(&self, app: &str, outcome: &'static str, now_ms: i64) {
        self.with(app, |recent| recent.last_recovery = Some((now_ms, outcome)));
    }

    fn last_recovery(&self, app: &str) -> Option<(i64, &'static str)> {
        let apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        apps.get(app).and_then(|r| r.last_recovery)
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    #[test]
    fn refusals_are_counted_for_an_hour() {
        let recent = Recent::default();
        let t0 = 1_700_000_000_000;
        recent.refused("a", "signature", t0);
        recent.refused("a", "signature", t0 + 1_000);
        recent.refused("a", "decrypt", t0 + 30 * 60_000);
        recent.refused("b", "signature", t0);
        let at = |t| recent.refusals("a", t);
        assert_eq!(at(t0 + 1_000).get("signature"), Some(&2));
        assert_eq!(at(t0 + 59 * 60_000).get("signature"), Some(&2));
        assert_eq!(at(t0 + 61 * 60_000).get("signature"), None);
        assert_eq!(at(t0 + 61 * 60_000).get("decrypt"), Some(&1));
        assert!(recent.refusals("c", t0).is_empty());
        recent.received("a", t0);
        recent.received("a", t0 + 60_000);
        recent.received("a", t0 + 60_500);
        let (received, refused) = recent.per_minute("a", t0 + 60_000);
        assert_eq!(received.len(), 60);
        assert_eq!(received[59], 2);
        assert_eq!(received[58], 1);
        assert_eq!(refused[58], 2);
        assert_eq!(recent.per_minute("a", t0 + 3 * 3_600_000).0, vec![0; 60]);
        recent.recovered("a", "ok", t0);
        assert_eq!(recent.last_recovery("a"), Some((t0, "ok")));
        assert_eq!(recent.last_recovery("b"), None);
    }
}
