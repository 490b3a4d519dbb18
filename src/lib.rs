//! dinghook: a DingTalk event-subscription gateway.

pub mod dingtalk;
