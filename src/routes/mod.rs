//! Routes: every verified event, carried on to the user's own systems. A route names the apps
//! and event types it takes and one destination ([`destination::Destination`]): signed HTTP
//! ([`webhook`]), NATS JetStream ([`jetstream`]), RabbitMQ ([`amqp`]) or Redis Streams
//! ([`redis_stream`]). Each event becomes one [`envelope::Envelope`], whatever the destination.

pub mod amqp;
mod broker;
pub mod config;
pub mod destination;
pub mod envelope;
pub mod jetstream;
pub mod redis_stream;
pub mod signing;
pub mod webhook;

use std::sync::Arc;

use config::{RouteSpec, Target};
use destination::Destination;

/// Why a route's destination cannot be made from its settings.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route}: {message}")]
    Destination { route: String, message: String },
}

/// The destination of `spec`. Nothing is connected here: a broker that cannot be reached at
/// start-up does not stop the server; its route retries (and says so in `/readyz` detail
/// and the metrics) until it can.
pub fn destination(spec: &RouteSpec) -> Result<Arc<dyn Destination>, RouteError> {
    let fail = |message: String| RouteError::Destination {
        route: spec.name.clone(),
        message,
    };
    match &spec.target {
        Target::Webhook { url, keys, headers } => {
            let webhook = webhook::Webhook::new(url, keys.clone(), headers, spec.timeout)
                .map_err(|e| fail(e.to_string()))?;
            Ok(Arc::new(webhook))
        }
        Target::Nats { url, subject } => {
            let nats = jetstream::JetStream::new(url, subject, spec.timeout).map_err(fail)?;
            Ok(Arc::new(nats))
        }
        Target::Amqp {
            url,
            exchange,
            routing_key,
        } => {
            let amqp = amqp::Amqp::new(url, exchange, routing_key, spec.timeout).map_err(fail)?;
            Ok(Arc::new(amqp))
        }
        Target::Redis {
            url,
            stream,
            maxlen,
        } => {
            let redis =
                redis_stream::RedisStream::new(url, stream, *maxlen, spec.timeout).map_err(fail)?;
            Ok(Arc::new(redis))
        }
    }
}

/// What the sources need of the routes: which take an event, and a wake-up for each route's
/// runner once an event with deliveries for it is stored.
#[derive(Clone, Default)]
pub struct Routing {
    routes: Arc<config::Routes>,
    /// One per route: `notify_one` keeps a permit for a runner busy claiming, so no wake-up
    /// is lost (it would wait a poll interval).
    wakes: Arc<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
}

impl Routing {
    pub fn new(routes: Arc<config::Routes>) -> Self {
        let wakes = routes
            .specs
            .iter()
            .map(|r| (r.name.clone(), Arc::new(tokio::sync::Notify::new())))
            .collect();
        Routing {
            routes,
            wakes: Arc::new(wakes),
        }
    }

    /// The wake-up of route `name`'s runner.
    pub fn wake_for(&self, name: &str) -> Arc<tokio::sync::Notify> {
        self.wakes
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(tokio::sync::Notify::new()))
    }

    /// Names in `event.routes` the routes that take it (DingTalk's events only: dinghook's
    /// own follow-up jobs are not routed).
    pub fn route(&self, event: &mut crate::store::NewEvent) {
        if self.routes.is_empty()
            || matches!(
                event.source,
                crate::store::Source::Internal | crate::store::Source::Api
            )
        {
            return;
        }
        event.routes = self.routes.matching(&event.app, &event.event_type);
    }

    /// The routes that take an event of `event_type` of `app`, whatever its source (for the
    /// events dinghook makes to be routed, such as an action's completion).
    pub fn matching(&self, app: &str, event_type: &str) -> Vec<String> {
        self.routes.matching(app, event_type)
    }

    /// An event with deliveries for `routes` was stored: their runners look at once.
    pub fn stored(&self, routes: &[String]) {
        for route in routes {
            if let Some(wake) = self.wakes.get(route) {
                wake.notify_one();
            }
        }
    }
}

pub mod runner;
