//! dinghook: a DingTalk event-subscription gateway.
