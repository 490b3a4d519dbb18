//! The same store behaviour, checked against every backend: SQLite always, PostgreSQL when
//! `DINGHOOK_TEST_PG_URL` is set. Time is passed in explicitly, so leases and retries are
//! tested without sleeping.

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use dinghook::store::{EventState, Inserted, NewEvent, ReplaySelector, Source, Store};
use support::stores::{fresh, open_url, Backend};

const T0: i64 = 1_800_000_000_000;

fn event(key: &str, event_type: &str, received_at: i64) -> NewEvent {
    NewEvent {
        dedup_key: key.to_owned(),
        event_type: event_type.to_owned(),
        corp_id: Some("dingcorp".into()),
        payload: format!(r#"{{"EventType":"{event_type}","eventId":"{key}"}}"#),
        source: Source::Push,
        received_at,
    }
}

async fn insert_n(store: &dyn Store, n: usize, at: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        match store
            .insert(event(&format!("k{i}"), "x", at + i as i64))
            .await
            .unwrap()
        {
            Inserted::Stored { id } => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    ids
}

async fn insert_and_dedup(store: Arc<dyn Store>) {
    let first = store.insert(event("a", "x", T0)).await.unwrap();
    let Inserted::Stored { id } = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        store.insert(event("a", "x", T0 + 5)).await.unwrap(),
        Inserted::Duplicate { id }
    );
    assert_eq!(store.count().await.unwrap(), 1);
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.state, EventState::Pending);
    assert_eq!(stored.received_at, T0);
    assert_eq!(stored.attempts, 0);
    assert_eq!(store.find_by_dedup_key("a").await.unwrap().unwrap().id, id);
}

async fn claim_with_lease(store: Arc<dyn Store>) {
    let ids = insert_n(&*store, 3, T0).await;
    let a = store.claim("w1", 2, 30_000, T0 + 10).await.unwrap();
    assert_eq!(a.iter().map(|e| e.id).collect::<Vec<_>>(), ids[..2]);
    assert!(a
        .iter()
        .all(|e| e.state == EventState::Running && e.attempts == 1));
    let b = store.claim("w2", 10, 30_000, T0 + 10).await.unwrap();
    assert_eq!(b.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
    assert!(store
        .claim("w3", 10, 30_000, T0 + 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.mark_done(ids[0], "w1", T0 + 20).await.unwrap());
    assert_eq!(
        store.get(ids[0]).await.unwrap().unwrap().state,
        EventState::Done
    );
    // Only the lease holder may record an outcome.
    assert!(!store.mark_done(ids[1], "w2", T0 + 20).await.unwrap());
    assert!(
        !store.mark_done(ids[0], "w1", T0 + 20).await.unwrap(),
        "done twice"
    );
}

async fn lease_expiry_returns_events(store: Arc<dyn Store>) {
    let ids = insert_n(&*store, 1, T0).await;
    let claimed = store.claim("dead-worker", 10, 1_000, T0).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Before the lease ends nobody else gets it.
    assert!(store
        .claim("w2", 10, 1_000, T0 + 999)
        .await
        .unwrap()
        .is_empty());
    let again = store.claim("w2", 10, 1_000, T0 + 1_001).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, ids[0]);
    assert_eq!(again[0].attempts, 2);
    // The dead worker's late answer is refused; the new holder's is taken.
    assert!(!store
        .mark_done(ids[0], "dead-worker", T0 + 1_100)
        .await
        .unwrap());
    assert!(store.mark_done(ids[0], "w2", T0 + 1_100).await.unwrap());
}

async fn retry_then_dead_then_replay(store: Arc<dyn Store>) {
    let ids = insert_n(&*store, 1, T0).await;
    let id = ids[0];
    store.claim("w", 1, 10_000, T0).await.unwrap();
    assert!(store
        .mark_retry(id, "w", T0 + 5_000, "boom 1", T0 + 1)
        .await
        .unwrap());
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (e.state, e.next_attempt_at),
        (EventState::Retry, T0 + 5_000)
    );
    assert_eq!(e.last_error.as_deref(), Some("boom 1"));
    assert!(store
        .claim("w", 1, 10_000, T0 + 4_999)
        .await
        .unwrap()
        .is_empty());
    let again = store.claim("w", 1, 10_000, T0 + 5_000).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 2));
    assert!(store
        .mark_dead(id, "w", "boom 2", T0 + 5_001)
        .await
        .unwrap());
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(e.state, EventState::Dead);
    assert_eq!(e.last_error.as_deref(), Some("boom 2"));
    assert!(store
        .claim("w", 1, 10_000, T0 + 99_999)
        .await
        .unwrap()
        .is_empty());

    let n = store
        .replay(&ReplaySelector::State(EventState::Dead), T0 + 6_000)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (e.state, e.attempts, e.next_attempt_at),
        (EventState::Pending, 0, T0 + 6_000)
    );
    assert_eq!(
        store.claim("w", 1, 10_000, T0 + 6_000).await.unwrap().len(),
        1
    );
}

async fn replay_by_ids_and_since_leaves_running_alone(store: Arc<dyn Store>) {
    let ids = insert_n(&*store, 4, T0).await;
    let running = store.claim("w", 1, 60_000, T0 + 10).await.unwrap();
    assert_eq!(running[0].id, ids[0]);
    for id in &ids[1..] {
        store.claim("w", 1, 60_000, T0 + 10).await.unwrap();
        assert!(store.mark_done(*id, "w", T0 + 11).await.unwrap());
    }
    let n = store
        .replay(&ReplaySelector::Ids(vec![ids[0], ids[1]]), T0 + 20)
        .await
        .unwrap();
    assert_eq!(n, 1, "the running event is not replayed");
    assert_eq!(
        store.get(ids[0]).await.unwrap().unwrap().state,
        EventState::Running
    );
    assert_eq!(
        store.get(ids[1]).await.unwrap().unwrap().state,
        EventState::Pending
    );
    // received_at of k2 is T0 + 2, of k3 T0 + 3.
    let n = store
        .replay(&ReplaySelector::Since(T0 + 3), T0 + 20)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        store.get(ids[3]).await.unwrap().unwrap().state,
        EventState::Pending
    );
    assert_eq!(
        store.get(ids[2]).await.unwrap().unwrap().state,
        EventState::Done
    );
}

async fn concurrent_claimers_never_share(store: Arc<dyn Store>) {
    insert_n(&*store, 200, T0).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{w}");
            let mut mine = Vec::new();
            loop {
                let batch = store.claim(&owner, 7, 60_000, T0 + 500).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                for e in batch {
                    assert!(store.mark_done(e.id, &owner, T0 + 501).await.unwrap());
                    mine.push(e.id);
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(seen.insert(id), "event {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), 200);
}

async fn stats_count_states_types_and_age(store: Arc<dyn Store>) {
    store
        .insert(event("a", "chat_update_title", T0))
        .await
        .unwrap();
    store
        .insert(event("b", "chat_update_title", T0 + 100))
        .await
        .unwrap();
    store
        .insert(event("c", "todo_task_create", T0 + 200))
        .await
        .unwrap();
    let claimed = store.claim("w", 1, 60_000, T0 + 1_000).await.unwrap();
    store
        .mark_done(claimed[0].id, "w", T0 + 1_000)
        .await
        .unwrap();
    let stats = store.stats(T0 + 10_000).await.unwrap();
    assert_eq!(stats.by_state["pending"], 2);
    assert_eq!(stats.by_state["done"], 1);
    assert_eq!(stats.by_state["dead"], 0);
    assert_eq!(stats.by_type["chat_update_title"]["done"], 1);
    assert_eq!(stats.by_type["todo_task_create"]["pending"], 1);
    assert_eq!(stats.oldest_pending_age_ms, Some(10_000 - 100));
}

async fn api_call_counter_survives_reopen(store: Arc<dyn Store>, url: &str) {
    assert_eq!(store.api_calls("2026-11").await.unwrap(), 0);
    assert_eq!(store.add_api_calls("2026-11", 3).await.unwrap(), 3);
    assert_eq!(store.add_api_calls("2026-11", 2).await.unwrap(), 5);
    assert_eq!(store.add_api_calls("2026-12", 1).await.unwrap(), 1);
    store.close().await;
    let reopened = open_url(url).await;
    assert_eq!(reopened.api_calls("2026-11").await.unwrap(), 5);
    assert_eq!(reopened.api_calls("2026-12").await.unwrap(), 1);
    reopened.close().await;
}

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(#[tokio::test] async fn $name() {
                let t = fresh(Backend::Sqlite).await.expect("sqlite is always available");
                super::$name(Arc::clone(&t.store)).await;
            })*
            #[tokio::test] async fn api_call_counter_survives_reopen() {
                let t = fresh(Backend::Sqlite).await.unwrap();
                super::api_call_counter_survives_reopen(Arc::clone(&t.store), &t.url).await;
            }
        }
        mod postgres {
            use super::*;
            $(#[tokio::test] async fn $name() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::$name(Arc::clone(&t.store)).await;
            })*
            #[tokio::test] async fn api_call_counter_survives_reopen() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::api_call_counter_survives_reopen(Arc::clone(&t.store), &t.url).await;
            }
        }
    };
}

for_each_backend!(
    insert_and_dedup,
    claim_with_lease,
    lease_expiry_returns_events,
    retry_then_dead_then_replay,
    replay_by_ids_and_since_leaves_running_alone,
    concurrent_claimers_never_share,
    stats_count_states_types_and_age,
);
