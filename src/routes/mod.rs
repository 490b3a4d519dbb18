//! Routes: every verified event, carried on to the user's own systems. A route names the apps
//! and event types it takes and one destination ([`destination::Destination`]): signed HTTP
//! ([`webhook`]), NATS JetStream, RabbitMQ or Redis Streams. Each event becomes one
//! [`envelope::Envelope`], whatever the destination.

pub mod config;
pub mod destination;
pub mod envelope;
pub mod signing;
pub mod webhook;
