//! dinghook: a DingTalk event-subscription (HTTP Push) gateway.
//!
//! The journey of an event: [`ingress`] verifies and decrypts it with [`crypto`], the
//! [`store`] makes it durable (de-duplicated by [`event::dedup_key`]), and only then is
//! DingTalk answered. The [`dispatch`]er then runs the [`handler`]s registered for its type,
//! which call DingTalk back through the one [`dingtalk::Client`]. [`app::Application`] wires
//! these together from a [`config::Config`].

pub mod app;
pub mod batch;
pub mod config;
pub mod crypto;
pub mod dingtalk;
pub mod dispatch;
pub mod event;
pub mod forwarded;
pub mod handler;
pub mod handlers;
pub mod ingress;
pub mod metrics;
pub mod recovery;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod template;

/// The README's Rust examples compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
