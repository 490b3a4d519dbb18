//! One runner per route: claims the route's due deliveries with a lease, sends each to the
//! destination (at most `concurrency` at once, at most `rate` a second) and records the
//! outcome. Routes never wait for each other, nor for the handlers or the acknowledgements:
//! each runner is its own task with its own claims.
//!
//! A destination that keeps failing trips the route's circuit breaker: the route is paused in
//! the store (its deliveries kept, not dead), probed with one delivery after a cool-down
//! that doubles up to [`MAX_COOL_DOWN`], and resumed when a probe succeeds. A 410 Gone pauses
//! it until it is resumed by hand (`dinghook routes resume NAME`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::config::RouteSpec;
use super::destination::{DeliveryError, Destination, Message};
use super::envelope::{Envelope, EventParts};
use crate::metrics::Metrics;
use crate::store::{DeliveryOutcome, Store, StoredDelivery, StoredEvent};
use crate::time::now_millis;

/// What a delivery's lease adds to the route's `timeout` (see `RouteRunner::lease`).
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Failures in a row that open the breaker.
pub const BREAKER_FAILURES: u32 = 10;
/// The first cool-down of an open breaker; doubled after each failed probe.
pub const FIRST_COOL_DOWN: Duration = Duration::from_secs(5);
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(300);
/// The reason a breaker writes when it pauses its route (and looks for, to probe it).
pub const BREAKER_REASON: &str = "circuit breaker";

/// How the runners find work and pace themselves.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Between looks for due deliveries when nothing pokes the runner.
    pub poll_interval: Duration,
    /// Names this process in leases.
    pub node: String,
}

pub struct RouteRunner {
    spec: RouteSpec,
    destination: Arc<dyn Destination>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    settings: RunnerSettings,
    /// Poked when an event with deliveries is stored, so they go out at once.
    wake: Arc<Notify>,
}

/// What one attempt came to, for the loop.
struct Attempt {
    /// The destination failed (the breaker counts these).
    failed: bool,
    /// The destination said 410 Gone.
    gone: bool,
}

impl RouteRunner {
    pub fn new(
        spec: RouteSpec,
        destination: Arc<dyn Destination>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        settings: RunnerSettings,
        wake: Arc<Notify>,
    ) -> Self {
        RouteRunner {
            spec,
            destination,
            store,
            metrics,
            settings,
            wake,
        }
    }

    /// The lease owner of this runner (what shutdown releases when the runner had to be
    /// abandoned).
    pub fn owner(&self) -> String {
        format!("{}-route-{}", self.settings.node, self.spec.name)
    }

    /// How long a claimed delivery stays this runner's: longer than any attempt may take (an
    /// attempt is bounded by the route's `timeout`) plus recording its outcome (one statement,
    /// bounded by the store's operation timeout, 5 s). A runner that dies (SIGKILL) leaves its
    /// deliveries to others after this.
    fn lease(&self) -> Duration {
        self.spec.timeout + LEASE_MARGIN
    }

    pub fn start(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(self.run(stop))
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let owner = this.owner();
        let lease_ms = crate::time::millis(this.lease());
        let capacity = this.spec.concurrency as usize;
        let mut in_flight: JoinSet<Attempt> = JoinSet::new();
        let mut failures = 0_u32;
        let mut cool_down = FIRST_COOL_DOWN;
        // While paused: when the breaker may probe (None: paused by hand or by a 410).
        let mut paused: Option<Option<tokio::time::Instant>> = None;
        // When the pause was last read (None: not yet).
        let mut checked_pause: Option<tokio::time::Instant> = None;
        let gap =
            (this.spec.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(this.spec.rate)));
        let mut next_send = tokio::time::Instant::now();
        // New deliveries may be due (set by a wake-up or the poll interval).
        let mut look = true;
        tracing::info!(route = %this.spec.name, kind = this.spec.target.kind(), url = %this.spec.shown_url, "route started");
        // Whether the destination can be reached, known before the first delivery (a broker
        // that is down at start shows in `/readyz` and `dinghook_route_up` at once).
        {
            let this = Arc::clone(&this);
            tokio::spawn(async move {
                let checked = tokio::time::timeout(this.spec.timeout, this.destination.check())
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer within {}",
                            crate::time::format_duration(this.spec.timeout)
                        ))
                    });
                if let Err(e) = &checked {
                    tracing::warn!(route = %this.spec.name, error = %e, "route destination unreachable");
                }
                this.metrics.route_reached(
                    &this.spec.name,
                    checked.as_ref().map(|_| ()).map_err(String::as_str),
                );
            });
        }
        loop {
            let stopping = *stop.borrow();
            if stopping && in_flight.is_empty() {
                break;
            }
            // The pause is the store's (by hand, from another replica): read at most once a
            // poll interval.
            let due = checked_pause.is_none_or(|at| at.elapsed() >= this.settings.poll_interval);
            if !stopping && due {
                checked_pause = Some(tokio::time::Instant::now());
                match this.store.deliveries().route_pauses().await {
                    Ok(pauses) => {
                        let pause = pauses.into_iter().find(|p| p.route == this.spec.name);
                        paused = match (pause, paused) {
                            (None, _) => None,
                            // Ours: keep the probe time we set.
                            (Some(p), Some(probe)) if p.reason.starts_with(BREAKER_REASON) => {
                                Some(probe.or(Some(tokio::time::Instant::now() + cool_down)))
                            }
                            (Some(p), _) if p.reason.starts_with(BREAKER_REASON) => {
                                Some(Some(tokio::time::Instant::now() + cool_down))
                            }
                            (Some(_), _) => Some(None),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(route = %this.spec.name, error = %e, "cannot read the route's pause")
                    }
                }
            }
            let probing = matches!(paused, Some(Some(at)) if tokio::time::Instant::now() >= at);
            let free = capacity.saturating_sub(in_flight.len());
            // Claim when there may be new deliveries (a wake-up, the poll interval), when half
            // the slots are free, or when idle; not for every delivery that ends, which would
            // be a claim (a store write) per delivery.
            let worth_it = look || free * 2 >= capacity || in_flight.is_empty();
            let may_claim = !stopping
                && free > 0
                && worth_it
                && (paused.is_none() || (probing && in_flight.is_empty()));
            let mut claimed_any = false;
            if may_claim {
                look = false;
                let limit = if probing { 1 } else { free };
                let limit = u32::try_from(limit).unwrap_or(u32::MAX);
                match this
                    .store
                    .deliveries()
                    .claim_deliveries(&this.spec.name, &owner, limit, lease_ms, now_millis())
                    .await
                {
                    Ok(batch) => {
                        claimed_any = !batch.is_empty();
                        for (delivery, event) in batch {
                            if let Some(gap) = gap {
                                tokio::time::sleep_until(next_send).await;
                                next_send = tokio::time::Instant::now().max(next_send) + gap;
                            }
                            let (this, owner) = (Arc::clone(&this), owner.clone());
                            in_flight
                                .spawn(async move { this.attempt(&owner, delivery, event).await });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(route = %this.spec.name, error = %e, "claim failed; trying again after the poll interval");
                    }
                }
            }
            if claimed_any && in_flight.len() < capacity && paused.is_none() {
                continue;
            }
            let room = in_flight.len() < capacity && !stopping;
            let probe_at = match paused {
                Some(Some(at)) => at,
                _ => tokio::time::Instant::now() + this.settings.poll_interval,
            };
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let Ok(attempt) = done else { continue };
                    if attempt.gone {
                        this.pause(&format!("410 Gone from the destination; resume with `dinghook routes resume {}`", this.spec.name)).await;
                        paused = Some(None);
                        continue;
                    }
                    if attempt.failed {
                        failures += 1;
                        if probing || failures >= BREAKER_FAILURES && paused.is_none() {
                            if paused.is_some() {
                                cool_down = (cool_down * 2).min(MAX_COOL_DOWN);
                            }
                            this.pause(&format!("{BREAKER_REASON}: {failures} failures in a row; probing again in {}", crate::time::format_duration(cool_down))).await;
                            paused = Some(Some(tokio::time::Instant::now() + cool_down));
                        }
                    } else {
                        failures = 0;
                        if paused.is_some() && probing {
                            cool_down = FIRST_COOL_DOWN;
                            this.resume().await;
                            paused = None;
                        }
                    }
                }
                () = tokio::time::sleep_until(probe_at) => look = true,
                () = this.wake.notified(), if room && paused.is_none() => look = true,
                _ = stop.changed(), if !stopping => {}
            }
        }
        match this
            .store
            .deliveries()
            .release_deliveries(&owner, now_millis())
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(route = %this.spec.name, deliveries = n, "unfinished deliveries put back")
            }
            Err(e) => {
                tracing::warn!(route = %this.spec.name, error = %e, "could not put deliveries back; they go again when their lease ends")
            }
        }
    }

    async fn pause(&self, reason: &str) {
        tracing::warn!(route = %self.spec.name, reason, "route paused");
        if let Err(e) = self
            .store
            .deliveries()
            .pause_route(&self.spec.name, reason, now_millis())
            .await
        {
            tracing::warn!(route = %self.spec.name, error = %e, "could not record the pause");
        }
    }

    async fn resume(&self) {
        tracing::info!(route = %self.spec.name, "probe delivered: route resumed");
        if let Err(e) = self.store.deliveries().resume_route(&self.spec.name).await {
            tracing::warn!(route = %self.spec.name, error = %e, "could not record the resume");
        }
    }

    /// One delivery: send, then record the outcome.
    async fn attempt(&self, owner: &str, delivery: StoredDelivery, event: StoredEvent) -> Attempt {
        let route = self.spec.name.as_str();
        let sent = self.send(&event).await;
        let now = now_millis();
        let (outcome, attempt, label) = match sent {
            Ok(delivered) => (
                DeliveryOutcome::Done {
                    status: delivered.status,
                },
                Attempt {
                    failed: false,
                    gone: false,
                },
                "done",
            ),
            Err(DeliveryError::Reject { message, status }) => (
                DeliveryOutcome::Dead {
                    error: message,
                    status,
                },
                // The destination answered: it is up, the message is what it refused.
                Attempt {
                    failed: false,
                    gone: false,
                },
                "dead",
            ),
            Err(DeliveryError::Gone { message, status }) => (
                // Kept for when the route is resumed.
                DeliveryOutcome::Retry {
                    at: crate::time::after(now, self.delay(delivery.attempts, None)),
                    error: message,
                    status,
                },
                Attempt {
                    failed: true,
                    gone: true,
                },
                "gone",
            ),
            Err(DeliveryError::Retry {
                message,
                status,
                retry_after,
            }) => {
                let attempt = Attempt {
                    failed: true,
                    gone: false,
                };
                let used_up = delivery.attempts > self.spec.retry_schedule.len() as i64;
                if used_up {
                    (
                        DeliveryOutcome::Dead {
                            error: format!("retries used up; last: {message}"),
                            status,
                        },
                        attempt,
                        "dead",
                    )
                } else {
                    (
                        DeliveryOutcome::Retry {
                            at: crate::time::after(now, self.delay(delivery.attempts, retry_after)),
                            error: message,
                            status,
                        },
                        attempt,
                        "retry",
                    )
                }
            }
        };
        let seconds = matches!(outcome, DeliveryOutcome::Done { .. })
            .then(|| (now - event.received_at).max(0) as f64 / 1000.0);
        self.metrics.route_delivery(route, label, seconds);
        match (&outcome, attempt.failed) {
            (_, false) => self.metrics.route_reached(route, Ok(())),
            (DeliveryOutcome::Retry { error, .. } | DeliveryOutcome::Dead { error, .. }, true) => {
                self.metrics.route_reached(route, Err(error))
            }
            (DeliveryOutcome::Done { .. }, true) => {}
        }
        if let DeliveryOutcome::Dead { error, .. } = &outcome {
            tracing::warn!(route, delivery = delivery.id, event = event.id, error = %error, "delivery dead");
        }
        match self
            .store
            .deliveries()
            .finish_delivery(delivery.id, owner, &outcome, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                route,
                delivery = delivery.id,
                "lease lost before the outcome was recorded; another runner has it"
            ),
            Err(e) => {
                tracing::warn!(route, delivery = delivery.id, error = %e, "could not record the outcome; it goes again when its lease ends")
            }
        }
        attempt
    }

    /// The wait before attempt `attempts + 1`: the schedule's, or the destination's wish if
    /// longer.
    fn delay(&self, attempts: i64, wish: Option<Duration>) -> Duration {
        let schedule = &self.spec.retry_schedule;
        let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(0);
        let planned = schedule
            .get(index)
            .or(schedule.last())
            .copied()
            .unwrap_or(Duration::from_secs(60));
        wish.map_or(planned, |w| w.max(planned))
    }

    async fn send(
        &self,
        event: &StoredEvent,
    ) -> Result<super::destination::Delivered, DeliveryError> {
        let parts = EventParts {
            app: &event.app,
            dedup_key: crate::store::scoped::unscoped(&event.app, &event.dedup_key),
            event_type: &event.event_type,
            corp_id: event.corp_id.as_deref(),
            received_at: event.received_at,
            source: &event.source,
            payload: &event.payload,
        };
        let envelope = Envelope::new(&parts).map_err(|e| DeliveryError::Reject {
            message: e.to_string(),
            status: None,
        })?;
        let message = Message {
            id: envelope.id.clone(),
            app: event.app.clone(),
            event_type: event.event_type.clone(),
            body: envelope.to_json(),
        };
        // The destination bounds its own waits; this bounds a destination that does not.
        match tokio::time::timeout(
            self.spec.timeout + Duration::from_secs(1),
            self.destination.deliver(&message),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::retry(format!(
                "no confirmation within {}",
                crate::time::format_duration(self.spec.timeout)
            ))),
        }
    }
}
