//! Recovery of failed pushes: DingTalk keeps the pushes it could not deliver (after its own
//! two retries) in a list that `call_back/get_call_back_failed_result` reads. Every
//! `recovery.interval`, and once at start-up, one process of the deployment reads that list
//! page by page until `has_more` is false and stores each entry as an event, through the same
//! de-duplication as the callback, so an event that also arrived by push is handled once.
//!
//! Reading a page deletes it on DingTalk's side. So a page is stored completely before the next
//! is asked for, and when storing fails the cycle stops at once: asking again would delete
//! entries we could not keep. The entries of the page that could not be stored are logged at
//! error level, whole, as the last place they exist.
//!
//! Only one process polls at a time ([`Store::try_lead`]: a PostgreSQL advisory lock; SQLite
//! has one process), so replicas do not split pages between them for nothing.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::dingtalk::{Client, FailedCallback, FailedCallbackPage};
use crate::event::{get_ci, Envelope};
use crate::metrics::Metrics;
use crate::store::{Inserted, NewEvent, Source, Store, StoreError};
use crate::time::{duration_str, now_millis};

/// The name recovery leads under ([`Store::try_lead`]).
pub const LEADER_NAME: &str = "recovery";

/// Keys under which DingTalk nests the pushed payload inside the per-tag value (approval,
/// role/label, everything else).
const PAYLOAD_KEYS: &[&str] = &["callbackData", "bpmsCallBackData", "roleLabelChange"];

/// Attempts to store one entry before the cycle gives up on it. The page is already gone from
/// DingTalk, so a short blip of the store should not cost events.
const STORE_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const STORE_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Entries of one page stored at once: they share the store's group commits.
const STORE_CONCURRENCY: usize = 16;

/// `[recovery]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Poll the failed-push list. Takes effect only when a DingTalk app key is configured.
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// Time between cycles (the first runs at start-up).
    #[serde(with = "duration_str")]
    pub interval: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            // 1 440 reads a month: under a third of the Standard edition's 5 000 calls.
            interval: Duration::from_secs(1800),
        }
    }
}

/// Why a cycle stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Asking for leadership or storing an entry failed.
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    /// Reading the failed-push list failed (a page in flight may be lost with it).
    #[error("reading the failed-push list failed: {0}")]
    DingTalk(#[from] crate::dingtalk::Error),
    /// The leader lock's session ended during the cycle; another replica may lead now.
    #[error("leadership was lost during the cycle")]
    LeadershipLost,
}

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CycleReport {
    /// False when another process leads; nothing was read.
    pub led: bool,
    /// Pages read from DingTalk.
    pub pages: u64,
    /// New events stored.
    pub stored: u64,
    /// Entries already in the inbox (they had arrived by push, or were read before).
    pub duplicates: u64,
}

/// The recovery task: see the module documentation.
pub struct Recovery {
    /// The app whose failed pushes it reads (labels its metrics and logs).
    app: String,
    store: Arc<dyn Store>,
    client: Client,
    interval: Duration,
    metrics: Arc<Metrics>,
    /// The dispatcher's wake-up, poked after new events are stored.
    wake: Arc<Notify>,
    /// The routes that take each recovered event.
    routing: crate::routes::Routing,
}

impl Recovery {
    pub fn new(
        app: &str,
        store: Arc<dyn Store>,
        client: Client,
        interval: Duration,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        Recovery {
            app: app.to_owned(),
            store,
            client,
            // A zero interval would make the timer panic; configuration refuses it anyway.
            interval: interval.max(Duration::from_millis(10)),
            metrics,
            wake,
            routing: crate::routes::Routing::default(),
        }
    }

    /// Recovered events go to the routes `routing` names, like pushed ones.
    pub fn with_routing(mut self, routing: crate::routes::Routing) -> Self {
        self.routing = routing;
        self
    }

    /// The task the application runs, or `None` (logged) when recovery is off or there is no
    /// DingTalk client to read the list with.
    pub fn from_config(
        app: &str,
        config: &RecoveryConfig,
        client: Option<Client>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Option<Self> {
        if !config.enabled {
            tracing::info!(
                app,
                "failed-push recovery is off (recovery.enabled = false)"
            );
            return None;
        }
        let Some(client) = client else {
            tracing::info!(
                app,
                "failed-push recovery is off: no DingTalk app key configured"
            );
            return None;
        };
        Some(Recovery::new(
            app,
            store,
            client,
            config.interval,
            metrics,
            wake,
        ))
    }

    /// Runs a cycle now and then every `interval` until `stop` turns true. A cycle in progress
    /// finishes the page it holds, then stops; the rest stays on DingTalk for the next start.
    pub fn start(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            tracing::info!(interval = ?self.interval, "failed-push recovery started");
            let mut ticks = tokio::time::interval(self.interval);
            // After a long cycle, wait a whole interval rather than catching up in a burst.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                if *stop.borrow() {
                    break;
                }
                // Errors are logged and counted inside; the next interval tries again.
                let _ = self.run_cycle(&stop).await;
            }
        })
    }

    /// One cycle: lead, then read and store pages until DingTalk has no more (or `stop`
    /// turns true, or something fails), then give leadership up.
    pub async fn run_cycle(
        &self,
        stop: &watch::Receiver<bool>,
    ) -> Result<CycleReport, RecoveryError> {
        let mut report = CycleReport::default();
        let guard = match self.store.try_lead(LEADER_NAME).await {
            Ok(Some(guard)) => guard,
            Ok(None) => {
                tracing::debug!("another replica is reading the failed-push list");
                self.metrics.recovery_run(&self.app, "not_leader");
                return Ok(report);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not ask for recovery leadership; trying next interval");
                self.metrics.recovery_run(&self.app, "store_error");
                return Err(e.into());
            }
        };
        report.led = true;
        let result = self.drain(&guard, stop, &mut report).await;
        guard.release().await;
        match &result {
            Ok(()) => {
                self.metrics.recovery_run(&self.app, "ok");
                if report.stored > 0 || report.duplicates > 0 {
                    tracing::info!(
                        pages = report.pages,
                        stored = report.stored,
                        duplicates = report.duplicates,
                        "recovered failed pushes"
                    );
                }
            }
            Err(RecoveryError::Store(e)) => {
                self.metrics.recovery_run(&self.app, "store_error");
                tracing::error!(
                    error = %e,
                    pages = report.pages,
                    stored = report.stored,
                    "failed-push recovery stopped: the store failed, so no further page was \
                     read (reading deletes it on DingTalk); the unstored entries are logged above"
                );
            }
            Err(RecoveryError::DingTalk(e)) => {
                self.metrics.recovery_run(&self.app, "dingtalk_error");
                // A refusal that will not go away is usually a missing permission.
                let hint = if e.is_permanent() {
                    "check that the app has the qyapi_base permission"
                } else {
                    "trying again next interval"
                };
                tracing::warn!(
                    error = %e,
                    pages = report.pages,
                    hint,
                    "failed-push recovery could not read the failed-push list"
                );
            }
            Err(e @ RecoveryError::LeadershipLost) => {
                self.metrics.recovery_run(&self.app, "leadership_lost");
                tracing::warn!(error = %e, pages = report.pages, "failed-push recovery stopped");
            }
        }
        result.map(|()| report)
    }

    async fn drain(
        &self,
        guard: &crate::store::LeaderGuard,
        stop: &watch::Receiver<bool>,
        report: &mut CycleReport,
    ) -> Result<(), RecoveryError> {
        loop {
            // Checked before each read: a replica that took over must not be doubled by us.
            if guard.lost() {
                return Err(RecoveryError::LeadershipLost);
            }
            let page = self.client.failed_callbacks().await?;
            report.pages += 1;
            self.store_page(&page, report).await?;
            if !page.has_more {
                return Ok(());
            }
            if *stop.borrow() {
                tracing::info!(
                    "stopping: the rest of the failed-push list waits for the next start"
                );
                return Ok(());
            }
        }
    }

    /// Stores every entry of `page`. On failure the entries that could not be stored are
    /// logged whole (DingTalk no longer has them) and the error is returned.
    async fn store_page(
        &self,
        page: &FailedCallbackPage,
        report: &mut CycleReport,
    ) -> Result<(), RecoveryError> {
        let mut results = Vec::with_capacity(page.entries.len());
        for chunk in page.entries.chunks(STORE_CONCURRENCY) {
            let mut inserts = Vec::with_capacity(chunk.len());
            for entry in chunk {
                inserts.push(self.store_entry(entry));
            }
            results.extend(futures_util::future::join_all(inserts).await);
        }
        let mut first_error = None;
        let mut any_stored = false;
        for (entry, result) in page.entries.iter().zip(results) {
            match result {
                Ok(Some(Inserted::Stored { id })) => {
                    any_stored = true;
                    report.stored += 1;
                    self.metrics.recovered_event(&self.app, "stored");
                    tracing::debug!(id, tag = ?entry.tag, "recovered event stored");
                }
                Ok(Some(Inserted::Duplicate { id })) => {
                    report.duplicates += 1;
                    self.metrics.recovered_event(&self.app, "duplicate");
                    tracing::debug!(id, tag = ?entry.tag, "recovered event was already stored");
                }
                Ok(None) => {}
                Err(e) => {
                    self.metrics.recovered_event(&self.app, "lost");
                    tracing::error!(
                        error = %e,
                        entry = %entry.raw,
                        "LOST a failed push: it could not be stored and DingTalk has deleted it"
                    );
                    first_error.get_or_insert(e);
                }
            }
        }
        if any_stored {
            self.wake.notify_one();
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Stores one entry, retrying briefly. `None`: not an event (a URL check).
    async fn store_entry(&self, entry: &FailedCallback) -> Result<Option<Inserted>, StoreError> {
        let Some(mut event) = recovered_event(entry, now_millis()) else {
            return Ok(None);
        };
        event.app = self.app.clone();
        self.routing.route(&mut event);
        let routes = event.routes.clone();
        let mut attempt = 1;
        loop {
            match self.store.insert(event.clone()).await {
                Ok(inserted) => {
                    if matches!(inserted, Inserted::Stored { .. }) {
                        self.routing.stored(&routes);
                    }
                    return Ok(Some(inserted));
                }
                Err(e) if attempt < STORE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "storing a recovered event failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(STORE_RETRY_DELAY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The event JSON for one failed-list entry, shaped as the push would have carried it:
///
/// - the per-tag value's payload (under `callbackData`, `bpmsCallBackData` or
///   `roleLabelChange`, else the value itself), when it is a JSON object or a string holding
///   one, gets `EventType` = the tag if it has none and `CorpId` from the entry if it has none.
///   `eventId` / `BizId` are kept, so the de-duplication key equals the pushed event's.
/// - anything else (a Java-map string like `{corpid=ding…}`, no payload, a list, …) becomes
///   `{"EventType": tag, "raw": <the whole entry>}`: stored and visible, never dropped. Its
///   handler (if any) sees it as undecodable.
pub fn event_json(entry: &FailedCallback) -> Value {
    let tag = entry.tag.clone().unwrap_or_else(|| "unknown".to_owned());
    let kept_raw = || {
        let mut object = Map::new();
        object.insert("EventType".into(), Value::String(tag.clone()));
        object.insert("raw".into(), entry.raw.clone());
        Value::Object(object)
    };
    let Some(Value::Object(outer)) = entry.payload_json() else {
        return kept_raw();
    };
    let inner = PAYLOAD_KEYS
        .iter()
        .find_map(|key| get_ci(&outer, key))
        .map(|value| match value {
            Value::String(text) => serde_json::from_str::<Value>(text).ok(),
            other => Some(other.clone()),
        });
    let mut event = match inner {
        // The payload is nested: it is the event; the wrapper only adds the corp id.
        Some(Some(Value::Object(inner))) => inner,
        Some(_) => return kept_raw(),
        // No wrapper (the documented `user_add_org` shape): the value itself is the event.
        None => outer.clone(),
    };
    if get_ci(&event, "EventType").is_none() {
        event.insert("EventType".into(), Value::String(tag));
    }
    if get_ci(&event, "CorpId").is_none() {
        if let Some(corp) = get_ci(&outer, "corpid").filter(|c| c.is_string()) {
            event.insert("CorpId".into(), corp.clone());
        }
    }
    Value::Object(event)
}

/// The event to store for one entry (see [`event_json`]), de-duplicated exactly as a push
/// does. `None` for DingTalk's URL checks, which are not events.
pub fn recovered_event(entry: &FailedCallback, now_ms: i64) -> Option<NewEvent> {
    let json = event_json(entry);
    let msg = json.to_string();
    // Always an object, so parsing cannot fail; the fallback keeps the code panic-free.
    let envelope = match Envelope::parse(msg.as_bytes()) {
        Ok((envelope, _)) => envelope,
        Err(_) => Envelope {
            event_type: entry.tag.clone().unwrap_or_else(|| "unknown".into()),
            corp_id: None,
            event_id: None,
            biz_id: None,
            event_time: entry.event_time,
        },
    };
    if envelope.is_check() {
        return None;
    }
    Some(NewEvent::from_envelope(
        envelope,
        msg,
        Source::Recovery,
        now_ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(raw: Value) -> FailedCallback {
        FailedCallback::from_entry(raw)
    }

    #[test]
    fn nested_payload_becomes_the_pushed_event_with_the_same_key() {
        let e = entry(json!({
            "call_back_tag": "chat_update_title", "event_time": 1,
            "chat_update_title": {"corpid": "ding1",
                "callbackData": {"eventId": "e-1", "title": "x", "ChatId": "c"}}
        }));
        let event = recovered_event(&e, 5).unwrap();
        assert_eq!(event.dedup_key, "event:e-1");
        assert_eq!(event.event_type, "chat_update_title");
        assert_eq!(event.corp_id.as_deref(), Some("ding1"));
        assert_eq!(event.source, Source::Recovery);
        let payload: Value = serde_json::from_str(&event.payload).unwrap();
        assert_eq!(payload["title"], "x");
        assert_eq!(payload["EventType"], "chat_update_title");
    }

    #[test]
    fn a_type_already_present_and_biz_ids_are_kept() {
        let e = entry(json!({
            "call_back_tag": "attendance_check_record",
            "attendance_check_record": {"callbackData":
                "{\"EventType\":\"attendance_check_record\",\"BizId\":\"b7\",\"CorpId\":\"c2\"}"}
        }));
        let event = recovered_event(&e, 5).unwrap();
        assert_eq!(event.dedup_key, "biz:attendance_check_record:b7");
        assert_eq!(event.corp_id.as_deref(), Some("c2"));
    }

    #[test]
    fn an_unwrapped_object_is_the_event() {
        let e = entry(json!({
            "call_back_tag": "user_add_org",
            "user_add_org": {"userid": ["u1"], "corpid": "ding1"}
        }));
        let payload = event_json(&e);
        assert_eq!(payload["EventType"], "user_add_org");
        assert_eq!(payload["userid"], json!(["u1"]));
        // `corpid` is the corp id already (keys are read case-insensitively).
        assert_eq!(
            recovered_event(&e, 5).unwrap().corp_id.as_deref(),
            Some("ding1")
        );
    }

    #[test]
    fn unparseable_entries_are_kept_whole() {
        for raw in [
            json!({"call_back_tag": "user_modify_org", "user_modify_org": "{corpid=ding1}"}),
            json!({"call_back_tag": "user_modify_org"}),
            json!({"call_back_tag": "user_modify_org", "user_modify_org": [1, 2]}),
            json!({"call_back_tag": "user_modify_org",
                   "user_modify_org": {"callbackData": "not json"}}),
        ] {
            let event = recovered_event(&entry(raw.clone()), 5).unwrap();
            assert_eq!(event.event_type, "user_modify_org");
            let payload: Value = serde_json::from_str(&event.payload).unwrap();
            assert_eq!(payload["raw"], raw);
            assert!(event.dedup_key.starts_with("sha256:"));
        }
        let odd = recovered_event(&entry(json!("not even an object")), 5).unwrap();
        assert_eq!(odd.event_type, "unknown");
    }

    #[test]
    fn url_checks_are_not_events() {
        let e = entry(json!({"call_back_tag": "check_url", "check_url": {}}));
        assert!(recovered_event(&e, 5).is_none());
    }
}
