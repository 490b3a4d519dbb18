//! One app's view of the store: what that app's handlers, recovery and client counter see.
//!
//! Every app shares one store. Its events carry the app's name (the `app` column), and what
//! belongs to an app is kept apart by name: de-duplication keys, document collections,
//! monthly call counters and leadership names of an app other than `default` are written
//! `@<app>/<name>`. Another app's view gets, lists and counts (`stats`) that app's events
//! only. The `default` app's view is the store itself, so a database from before apps existed
//! is the `default` app's, unchanged and without a data migration (and that view sees every
//! app's events; `stats_for(Some("default"))` gives the `default` app's counts). App names
//! (`[a-z0-9_-]`) never contain `@` or `/`, and no unscoped name starts with `@`, so two apps'
//! names can never meet.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    Document, EventRun, Inserted, LeaderGuard, ListQuery, NewEvent, PruneEvents, ReplaySelector,
    Stats, Store, StoreError, StoredEvent,
};

/// The app whose names are written unscoped (`crate::config::DEFAULT_APP`; repeated here, as
/// the store may not import the configuration).
pub const DEFAULT_APP: &str = "default";

/// `name` as app `app` writes it.
pub fn scoped(app: &str, name: &str) -> String {
    if app == DEFAULT_APP {
        name.to_owned()
    } else {
        format!("@{app}/{name}")
    }
}

/// `name` as app `app` wrote it, without its scope: what users see (`events list` shows the
/// dedup key `event:<id>` beside the app's name, not `@ops/event:<id>`).
pub fn unscoped<'a>(app: &str, name: &'a str) -> &'a str {
    name.strip_prefix('@')
        .and_then(|rest| rest.strip_prefix(app))
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(name)
}

/// The store as app `app` sees it (see the module comment).
pub fn for_app(store: Arc<dyn Store>, app: &str) -> Arc<dyn Store> {
    if app == DEFAULT_APP {
        return store;
    }
    Arc::new(AppStore {
        inner: store,
        app: app.to_owned(),
    })
}

struct AppStore {
    inner: Arc<dyn Store>,
    app: String,
}

impl AppStore {
    fn scope(&self, name: &str) -> String {
        scoped(&self.app, name)
    }
}

#[async_trait]
impl Store for AppStore {
    async fn schedule(&self, mut event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError> {
        event.dedup_key = self.scope(&event.dedup_key);
        event.app = self.app.clone();
        self.inner.schedule(event, due_at_ms).await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.inner.probe().await
    }

    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self
            .inner
            .get(id)
            .await?
            .filter(|event| event.app == self.app))
    }

    async fn prune_events(&self, rule: &PruneEvents) -> Result<u64, StoreError> {
        // This app's events only.
        let rule = PruneEvents {
            app: self.app.clone(),
            ..rule.clone()
        };
        self.inner.prune_events(&rule).await
    }

    async fn discard(&self, ids: &[i64]) -> Result<u64, StoreError> {
        // This app's events only.
        let mut mine = Vec::with_capacity(ids.len());
        for &id in ids {
            if self.get(id).await?.is_some() {
                mine.push(id);
            }
        }
        if mine.is_empty() {
            return Ok(0);
        }
        self.inner.discard(&mine).await
    }

    async fn prune_documents(
        &self,
        collection: &str,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.inner
            .prune_documents(&self.scope(collection), before_ms, limit)
            .await
    }

    async fn runs(&self, id: i64, limit: u32) -> Result<Vec<EventRun>, StoreError> {
        // Only this app's: another app's event has none here.
        match self.get(id).await? {
            Some(_) => self.inner.runs(id, limit).await,
            None => Ok(Vec::new()),
        }
    }

    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.inner.find_by_dedup_key(&self.scope(key)).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let mut query = query.clone();
        query.app = Some(self.app.clone());
        self.inner.list(&query).await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.inner.count().await
    }

    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.claim(owner, limit, lease_ms, now_ms).await
    }

    async fn claim_apps(
        &self,
        owner: &str,
        shares: &[(String, u32)],
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.claim_apps(owner, shares, lease_ms, now_ms).await
    }

    async fn waiting_apps(&self) -> Result<Vec<String>, StoreError> {
        self.inner.waiting_apps().await
    }

    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
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
        self.inner
            .mark_dead(id, owner, error, handled, now_ms)
            .await
    }

    async fn release(&self, owners: &[String], now_ms: i64) -> Result<u64, StoreError> {
        self.inner.release(owners, now_ms).await
    }

    async fn replay(&self, selector: &ReplaySelector, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.replay(selector, now_ms).await
    }

    /// This app's counts, whatever is asked: another app's are not this view's to show (as
    /// [`Store::get`] does not show another app's events), so asking for one gives zeros.
    async fn stats_for(&self, app: Option<&str>, now_ms: i64) -> Result<Stats, StoreError> {
        match app {
            Some(other) if other != self.app => {
                Ok(super::schema::stats_from([], [], Some(other), now_ms))
            }
            _ => self.inner.stats_for(Some(&self.app), now_ms).await,
        }
    }

    async fn put_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner
            .put_document(&self.scope(collection), key, body, now_ms)
            .await
    }

    async fn insert_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.inner
            .insert_document(&self.scope(collection), key, body, now_ms)
            .await
    }

    async fn get_document(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        let found = self
            .inner
            .get_document(&self.scope(collection), key)
            .await?;
        Ok(found.map(|d| Document {
            collection: collection.to_owned(),
            ..d
        }))
    }

    async fn list_documents(
        &self,
        collection: &str,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError> {
        let found = self
            .inner
            .list_documents(&self.scope(collection), limit)
            .await?;
        Ok(found
            .into_iter()
            .map(|d| Document {
                collection: collection.to_owned(),
                ..d
            })
            .collect())
    }

    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError> {
        self.inner.add_api_calls(&self.scope(month), n).await
    }

    async fn api_calls(&self, month: &str) -> Result<u64, StoreError> {
        self.inner.api_calls(&self.scope(month)).await
    }

    async fn close(&self) {
        // The shared store is closed once, by its owner.
    }

    async fn try_lead(&self, name: &str) -> Result<Option<LeaderGuard>, StoreError> {
        self.inner.try_lead(&self.scope(name)).await
    }

    fn deliveries(&self) -> &dyn super::Deliveries {
        self.inner.deliveries()
    }
}
