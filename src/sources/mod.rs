//! Every way an event gets in. Each source verifies what it receives, turns it into a
//! [`NewEvent`](crate::store::NewEvent) with the de-duplication key every source shares, and
//! acknowledges only what the store has committed.
//!
//! - [`push`]: DingTalk's HTTP Push callback.
//! - [`recovery`]: DingTalk's list of pushes it failed to deliver, read back periodically.
//! - [`stream`]: DingTalk's Stream mode, an outbound WebSocket (no public URL needed).
//! - [`robot`]: messages to the app's robot, POSTed by DingTalk and signed with the AppSecret.

pub mod push;
pub mod recovery;
pub mod robot;
pub mod stream;
