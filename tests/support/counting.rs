//! A store that counts every call by operation and passes it on to a real store: how many
//! round trips to the store one event costs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dinghook::store::{
    Document, EventRun, Inserted, LeaderGuard, ListQuery, NewEvent, PruneEvents, ReplaySelector,
    Stats, Store, StoreError, StoredEvent,
};

pub struct CountingStore {
    inner: Arc<dyn Store>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    /// Added before each `stats`, to stand for a slow store.
    stats_delay: Mutex<std::time::Duration>,
    /// While true, every `insert` fails (a store outage) without reaching the real store.
    fail_inserts: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(CountingStore {
            inner,
            calls: Mutex::new(BTreeMap::new()),
            stats_delay: Mutex::new(std::time::Duration::ZERO),
            fail_inserts: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes every later `stats` take `delay` longer.
    pub fn set_stats_delay(&self, delay: std::time::Duration) {
        *self.stats_delay.lock().unwrap() = delay;
    }

    /// Makes every later `insert` fail (`true`) or work again (`false`).
    pub fn set_fail_inserts(&self, fail: bool) {
        self.fail_inserts
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    fn count(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_insert(0) += 1;
    }

    /// Calls so far by operation.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().unwrap().clone()
    }

    pub fn reset(&self) {
        self.calls.lock().unwrap().clear();
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn insert(&self, event: NewEvent) -> Result<Inserted, StoreError> {
        self.count("insert");
        if self.fail_inserts.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("inserts fail (test outage)".into()));
        }
        self.inner.insert(event).await
    }
    async fn schedule(&self, event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError> {
        self.count("schedule");
        self.inner.schedule(event, due_at_ms).await
    }
    async fn probe(&self) -> Result<(), StoreError> {
        self.count("probe");
        self.inner.probe().await
    }
    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError> {
        self.count("get");
        self.inner.get(id).await
    }
    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.count("find_by_dedup_key");
        self.inner.find_by_dedup_key(key).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError> {
        self.count("list");
        self.inner.list(query).await
    }
    async fn count(&self) -> Result<u64, StoreError> {
        self.count("count");
        self.inner.count().await
    }
    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let claimed = self.inner.claim(owner, limit, lease_ms, now_ms).await?;
        // Idle polls are not the event's cost.
        if !claimed.is_empty() {
            self.count("claim");
        }
        Ok(claimed)
    }
    async fn claim_apps(
        &self,
        owner: &str,
        shares: &[(String, u32)],
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let claimed = self
            .inner
            .claim_apps(owner, shares, lease_ms, now_ms)
            .await?;
        if !claimed.is_empty() {
            self.count("claim");
        }
        Ok(claimed)
    }

    async fn waiting_apps(&self) -> Result<Vec<String>, StoreError> {
        self.inner.waiting_apps().await
    }

    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.count("mark_done");
        self.inner.mark_done(id, owner, now_ms).await
    }
    async fn mark_retry(
        &self,
        id: i64,
        owner: &str,
        at_ms: i64,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.count("mark_retry");
        self.inner
            .mark_retry(id, owner, at_ms, error, handled, now_ms)
            .await
    }
    async fn mark_dead(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.count("mark_dead");
        self.inner
            .mark_dead(id, owner, error, handled, now_ms)
            .await
    }
    async fn prune_events(&self, rule: &PruneEvents) -> Result<u64, StoreError> {
        self.count("prune_events");
        self.inner.prune_events(rule).await
    }

    async fn discard(&self, ids: &[i64]) -> Result<u64, StoreError> {
        self.count("discard");
        self.inner.discard(ids).await
    }

    async fn prune_documents(
        &self,
        collection: &str,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.count("prune_documents");
        self.inner
            .prune_documents(collection, before_ms, limit)
            .await
    }

    async fn runs(&self, id: i64, limit: u32) -> Result<Vec<EventRun>, StoreError> {
        self.count("runs");
        self.inner.runs(id, limit).await
    }

    async fn release(&self, owners: &[String], now_ms: i64) -> Result<u64, StoreError> {
        self.count("release");
        self.inner.release(owners, now_ms).await
    }
    async fn replay(&self, selector: &ReplaySelector, now_ms: i64) -> Result<u64, StoreError> {
        self.count("replay");
        self.inner.replay(selector, now_ms).await
    }
    async fn stats_for(&self, app: Option<&str>, now_ms: i64) -> Result<Stats, StoreError> {
        self.count("stats");
        let delay = *self.stats_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.inner.stats_for(app, now_ms).await
    }
    async fn put_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.count("put_document");
        self.inner.put_document(collection, key, body, now_ms).await
    }
    async fn insert_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.count("insert_document");
        self.inner
            .insert_document(collection, key, body, now_ms)
            .await
    }
    async fn get_document(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        self.count("get_document");
        self.inner.get_document(collection, key).await
    }
    async fn list_documents(
        &self,
        collection: &str,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError> {
        self.count("list_documents");
        self.inner.list_documents(collection, limit).await
    }
    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError> {
        self.count("add_api_calls");
        self.inner.add_api_calls(month, n).await
    }
    async fn api_calls(&self, month: &str) -> Result<u64, StoreError> {
        self.count("api_calls");
        self.inner.api_calls(month).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn try_lead(&self, name: &str) -> Result<Option<LeaderGuard>, StoreError> {
        self.count("try_lead");
        self.inner.try_lead(name).await
    }
    fn deliveries(&self) -> &dyn dinghook::store::Deliveries {
        self.inner.deliveries()
    }
}
