//! dinghook: a DingTalk event gateway.
//!
//! An event's journey, top to bottom, one room each:
//!
//! 1. [`sources`] — every way an event gets in. [`sources::push`] is DingTalk's HTTP callback:
//!    it verifies and decrypts the request with [`crypto`], reads the [`event`] envelope and
//!    answers only after the store committed it. [`sources::recovery`] reads back the pushes
//!    DingTalk failed to deliver.
//! 2. [`store`] — the inbox: one durable row per distinct event (SQLite embedded, or
//!    PostgreSQL for several replicas), and the documents the built-in handlers keep.
//! 3. [`dispatch`] — claims due events with a lease, decodes the typed [`Event`], runs every
//!    [`handler`] registered for its type and records each one's outcome.
//! 4. Sinks — the handlers: [`builtin`] ones, enabled by the configuration, and a program's
//!    own, registered on the [`AppBuilder`]. They act on DingTalk through the one
//!    [`dingtalk::Client`] (token, QPS, monthly quota).
//!
//! Beside the journey: [`ops`] (`/healthz`, `/readyz`, `/metrics`), [`metrics`],
//! [`telemetry`], and the foundations every room may use: [`time`], [`crypto`], [`event`],
//! [`secret`], [`setting`]. [`config`] composes each room's section, [`app`] wires the rooms
//! into an [`Application`], and [`cli`] is the `dinghook` command line.

pub mod actions;
pub mod api;
pub mod app;
pub mod batch;
pub mod builtin;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dingtalk;
pub mod dispatch;
pub mod event;
pub mod forwarded;
pub mod handler;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod retention;
pub mod routes;
pub mod secret;
pub mod server;
pub mod setting;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod time;

pub use app::{AppBuilder, AppError, Application};
pub use config::{Config, ConfigError};
pub use event::Event;
pub use handler::{Context, Handler, HandlerError, Registrations};

/// The README's Rust examples compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
