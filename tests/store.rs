//! The same store behaviour, checked against every backend: SQLite always, PostgreSQL when
//! `DINGHOOK_TEST_PG_URL` is set. Time is passed in explicitly, so leases and retries are
//! tested without sleeping.

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use dinghook::store::postgres::{PostgresOptions, PostgresStore};
use dinghook::store::{
    scoped, EventState, Inserted, NewEvent, ReplaySelector, Source, Store, StoreError,
};
use support::stores::{fresh, open_url, Backend};

const T0: i64 = 1_800_000_000_000;

fn event(key: &str, event_type: &str, received_at: i64) -> NewEvent {
    NewEvent {
        app: "default".into(),
        dedup_key: key.to_owned(),
        event_type: event_type.to_owned(),
        corp_id: Some("dingcorp".into()),
        payload: format!(r#"{{"EventType":"{event_type}","eventId":"{key}"}}"#),
        source: Source::Push,
        received_at,
        routes: Vec::new(),
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
        .mark_retry(id, "w", T0 + 5_000, "boom 1", &[], T0 + 1)
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
        .mark_dead(id, "w", "boom 2", &[], T0 + 5_001)
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

/// Every run is recorded when it ends, by whoever ends it: outcomes, errors, the handlers
/// done, a release at shutdown, a lease that ran out; a replay starts counting again; the
/// runs of one event are not another's; a refused (late) outcome records nothing.
async fn runs_are_recorded_as_they_end(store: Arc<dyn Store>) {
    let id = insert_n(&*store, 1, T0).await[0];
    assert!(store.runs(id, 100).await.unwrap().is_empty(), "never run");

    let claimed = store.claim("w1", 1, 1_000, T0 + 10).await.unwrap();
    assert_eq!(claimed[0].id, id);
    let handled = names(&["a"]);
    assert!(store
        .mark_retry(id, "w1", T0 + 500, "boom 1", &handled, T0 + 20)
        .await
        .unwrap());
    store.claim("w1", 1, 1_000, T0 + 500).await.unwrap();
    // w1 hangs; w2 takes the event when the lease has run out, then w1's answer is refused.
    store.claim("w2", 1, 1_000, T0 + 1_600).await.unwrap();
    assert!(!store.mark_done(id, "w1", T0 + 1_700).await.unwrap());
    // w2 is stopping: it gives the event back.
    assert_eq!(
        store.release(&["w2".to_owned()], T0 + 1_800).await.unwrap(),
        1
    );
    store.claim("w3", 1, 1_000, T0 + 1_900).await.unwrap();
    assert!(store
        .mark_dead(id, "w3", "boom 2", &handled, T0 + 1_950)
        .await
        .unwrap());
    store
        .replay(&ReplaySelector::Ids(vec![id]), T0 + 2_000)
        .await
        .unwrap();
    store.claim("w4", 1, 1_000, T0 + 2_100).await.unwrap();
    assert!(store.mark_done(id, "w4", T0 + 2_150).await.unwrap());

    let runs = store.runs(id, 100).await.unwrap();
    let seen: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.attempt,
                r.started_at - T0,
                r.finished_at.map(|t| t - T0),
                r.outcome.as_str(),
                r.error.as_deref(),
                r.worker.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, 10, Some(20), "retry", Some("boom 1"), Some("w1")),
            (2, 500, Some(1_600), "lease_expired", None, Some("w1")),
            // The release does not count the interrupted run; the next claim is the 3rd again.
            (3, 1_600, Some(1_800), "released", None, Some("w2")),
            (3, 1_900, Some(1_950), "dead", Some("boom 2"), Some("w3")),
            (1, 2_100, Some(2_150), "done", None, Some("w4")),
        ]
    );
    assert_eq!(runs[0].handled, handled);
    assert_eq!(runs[3].handled, handled);
    assert!(runs[4].handled.is_empty());
    // The last two, oldest first.
    let last: Vec<_> = store
        .runs(id, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.outcome)
        .collect();
    assert_eq!(last, ["dead", "done"]);
    let Inserted::Stored { id: other } = store.insert(event("k-other", "x", T0)).await.unwrap()
    else {
        panic!("k-other is new")
    };
    assert!(store.runs(other, 100).await.unwrap().is_empty());
}

/// Stores `e` and runs it to `state` (`done` or `dead`) at `at`; returns its id.
async fn ended(store: &dyn Store, e: NewEvent, state: EventState, at: i64) -> i64 {
    let Inserted::Stored { id } = store.insert(e).await.unwrap() else {
        panic!("a new key")
    };
    let claimed = store.claim("w", 100, 1_000, at).await.unwrap();
    assert!(claimed.iter().any(|c| c.id == id));
    for c in claimed {
        let ok = match (c.id == id, state) {
            (true, EventState::Dead) => store.mark_dead(c.id, "w", "no", &[], at).await,
            _ => store.mark_done(c.id, "w", at).await,
        };
        assert!(ok.unwrap());
    }
    id
}

/// Retention: the events a rule selects go, oldest first, `limit` at a time, with their runs
/// and deliveries, and the counts follow; an event with a delivery still waiting stays, and
/// one with a dead delivery stays as long as a dead event would; recent events, other states
/// and other apps' events stay. Documents go by age, in their collection only.
async fn prune_deletes_what_retention_allows(store: Arc<dyn Store>) {
    use dinghook::store::{DeliveryOutcome, PruneEvents};
    const DAY: i64 = 86_400_000;
    let old = T0;
    let done = ended(
        &*store,
        event("done-1", "x", old),
        EventState::Done,
        old + 10,
    )
    .await;
    let dead = ended(
        &*store,
        event("dead-1", "x", old),
        EventState::Dead,
        old + 10,
    )
    .await;
    let waiting = ended(
        &*store,
        NewEvent {
            routes: vec!["r".into()],
            ..event("waiting-1", "x", old)
        },
        EventState::Done,
        old + 10,
    )
    .await;
    let dead_delivery = ended(
        &*store,
        NewEvent {
            routes: vec!["s".into()],
            ..event("dead-delivery-1", "x", old)
        },
        EventState::Done,
        old + 10,
    )
    .await;
    let d = store.deliveries();
    let (delivery, _) = d
        .claim_deliveries("s", "r1", 1, 1_000, old + 20)
        .await
        .unwrap()[0]
        .clone();
    let gone = DeliveryOutcome::Dead {
        error: "410".into(),
        status: Some(410),
    };
    assert!(d
        .finish_delivery(delivery.id, "r1", &gone, old + 30)
        .await
        .unwrap());
    let other_app = ended(
        &*store,
        NewEvent {
            app: "ops".into(),
            ..event("@ops/done-1", "x", old)
        },
        EventState::Done,
        old + 10,
    )
    .await;
    let before = store.stats(old + 31 * DAY).await.unwrap();

    let rule = |state, dead_before| PruneEvents {
        app: "default".into(),
        state,
        before_ms: old + 7 * DAY,
        dead_deliveries_before_ms: dead_before,
        limit: 100,
    };
    // Done, a week old, dead deliveries kept for a month: only the plain done event.
    assert_eq!(
        store
            .prune_events(&rule(EventState::Done, old))
            .await
            .unwrap(),
        1
    );
    assert!(store.get(done).await.unwrap().is_none());
    assert!(
        store.runs(done, 10).await.unwrap().is_empty(),
        "its runs go with it"
    );
    for kept in [dead, waiting, dead_delivery, other_app] {
        assert!(store.get(kept).await.unwrap().is_some(), "{kept} stays");
    }
    let after = store.stats(old + 31 * DAY).await.unwrap();
    assert_eq!(
        after.by_state["done"],
        before.by_state["done"] - 1,
        "the counts follow"
    );
    // Once the dead delivery is as old as a dead event may be, it goes with its event.
    assert_eq!(
        store
            .prune_events(&rule(EventState::Done, old + 7 * DAY))
            .await
            .unwrap(),
        1
    );
    assert!(store.get(dead_delivery).await.unwrap().is_none());
    assert!(d.get_delivery(delivery.id).await.unwrap().is_none());
    assert!(
        store.get(waiting).await.unwrap().is_some(),
        "its delivery still waits"
    );
    assert_eq!(
        store
            .prune_events(&rule(EventState::Dead, old))
            .await
            .unwrap(),
        1
    );
    assert!(store.get(dead).await.unwrap().is_none());
    assert_eq!(
        store
            .prune_events(&rule(EventState::Dead, old))
            .await
            .unwrap(),
        0
    );

    // `limit` at a time, oldest first.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            ended(
                &*store,
                event(&format!("batch-{i}"), "x", old + i),
                EventState::Done,
                old + 100,
            )
            .await,
        );
    }
    let two = PruneEvents {
        limit: 2,
        ..rule(EventState::Done, old)
    };
    assert_eq!(store.prune_events(&two).await.unwrap(), 2);
    assert!(
        store.get(ids[0]).await.unwrap().is_none() && store.get(ids[1]).await.unwrap().is_none()
    );
    assert!(store.get(ids[2]).await.unwrap().is_some());
    assert_eq!(store.prune_events(&two).await.unwrap(), 2);
    assert_eq!(store.prune_events(&two).await.unwrap(), 1);
    assert_eq!(store.prune_events(&two).await.unwrap(), 0);
    // Ids follow the time events are received in (the prune reads no further than the first
    // event received after its cutoff): one received now is not touched.
    let recent = ended(
        &*store,
        event("recent-1", "x", old + 30 * DAY),
        EventState::Done,
        old + 30 * DAY,
    )
    .await;
    assert_eq!(
        store
            .prune_events(&rule(EventState::Done, old))
            .await
            .unwrap(),
        0
    );
    assert!(store.get(recent).await.unwrap().is_some());

    // Documents by age, one collection at a time.
    let body = serde_json::json!({"k": 1});
    store
        .put_document("audit", "old", &body, old)
        .await
        .unwrap();
    store
        .put_document("audit", "new", &body, old + 30 * DAY)
        .await
        .unwrap();
    store
        .put_document("group", "old", &body, old)
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_documents("audit", old + DAY, 100)
            .await
            .unwrap(),
        1
    );
    assert!(store.get_document("audit", "old").await.unwrap().is_none());
    assert!(store.get_document("audit", "new").await.unwrap().is_some());
    assert!(store.get_document("group", "old").await.unwrap().is_some());
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

async fn handled_kept_by_retry_dead_replay_and_release_cleared_by_done(store: Arc<dyn Store>) {
    let ids = insert_n(&*store, 2, T0).await;
    let (id, other) = (ids[0], ids[1]);
    let claimed = store.claim("w", 2, 10_000, T0 + 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|e| e.handled.is_empty()), "{claimed:?}");

    // A retry records the handlers that succeeded; the next claim and `get` return them.
    assert!(store
        .mark_retry(id, "w", T0 + 100, "b failed", &names(&["a"]), T0 + 1)
        .await
        .unwrap());
    assert_eq!(store.get(id).await.unwrap().unwrap().handled, ["a"]);
    let again = store.claim("w", 2, 10_000, T0 + 100).await.unwrap();
    assert_eq!((again.len(), again[0].id), (1, id));
    assert_eq!(again[0].handled, ["a"]);

    // Dead records them too (replacing what the retry recorded), and a replay keeps them, so
    // the replayed event re-runs only the handlers that had not succeeded.
    assert!(store
        .mark_dead(id, "w", "c failed", &names(&["a", "b"]), T0 + 101)
        .await
        .unwrap());
    let dead = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (dead.state, dead.handled.clone()),
        (EventState::Dead, names(&["a", "b"]))
    );
    let found = store
        .find_by_dedup_key(&dead.dedup_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.handled, ["a", "b"]);
    assert_eq!(
        store
            .replay(&ReplaySelector::Ids(vec![id]), T0 + 200)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.get(id).await.unwrap().unwrap().handled, ["a", "b"]);
    let again = store.claim("w", 1, 10_000, T0 + 200).await.unwrap();
    assert_eq!(
        (again[0].id, again[0].handled.clone()),
        (id, names(&["a", "b"]))
    );

    // Giving the lease up keeps them as well.
    assert_eq!(store.release(&names(&["w"]), T0 + 201).await.unwrap(), 2);
    assert_eq!(store.get(id).await.unwrap().unwrap().handled, ["a", "b"]);
    let again = store.claim("w", 2, 10_000, T0 + 202).await.unwrap();
    assert_eq!(again.len(), 2);

    // Done forgets them: a done event replayed runs every handler again.
    assert!(store.mark_done(id, "w", T0 + 203).await.unwrap());
    let done = store.get(id).await.unwrap().unwrap();
    assert_eq!((done.state, done.handled.len()), (EventState::Done, 0));
    store
        .replay(&ReplaySelector::State(EventState::Done), T0 + 300)
        .await
        .unwrap();
    assert!(store.get(id).await.unwrap().unwrap().handled.is_empty());

    // An outcome with no handler succeeded records none.
    assert!(store
        .mark_retry(other, "w", T0 + 400, "all failed", &[], T0 + 204)
        .await
        .unwrap());
    assert!(store.get(other).await.unwrap().unwrap().handled.is_empty());
    let listed = store.list(&Default::default()).await.unwrap();
    assert!(listed.iter().all(|e| e.handled.is_empty()), "{listed:?}");
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

/// `claim_apps` takes at most each app's share of its due events, oldest first, in one go.
async fn claim_apps_takes_each_apps_share(store: Arc<dyn Store>) {
    for (app, n) in [("a", 5), ("b", 2), ("c", 1)] {
        for i in 0..n {
            let mut ev = event(&format!("@{app}/k{i}"), "x", T0 + i);
            ev.app = app.into();
            store.insert(ev).await.unwrap();
        }
    }
    let later = NewEvent {
        app: "c".into(),
        ..event("@c/later", "x", T0)
    };
    store.schedule(later, T0 + 60_000).await.unwrap();
    let shares = [
        ("a".to_owned(), 3),
        ("b".to_owned(), 5),
        ("c".to_owned(), 5),
        ("z".to_owned(), 4),
    ];
    let claimed = store
        .claim_apps("w", &shares, 1_000, T0 + 10)
        .await
        .unwrap();
    let mut got: Vec<(String, String)> = claimed
        .iter()
        .map(|e| (e.app.clone(), e.dedup_key.clone()))
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [
        ("a", "@a/k0"),
        ("a", "@a/k1"),
        ("a", "@a/k2"),
        ("b", "@b/k0"),
        ("b", "@b/k1"),
        ("c", "@c/k0"),
    ]
    .iter()
    .map(|(a, k)| (a.to_string(), k.to_string()))
    .collect();
    assert_eq!(
        got, want,
        "the oldest of each, none not yet due, none of other apps"
    );
    assert!(claimed
        .iter()
        .all(|e| e.state == EventState::Running && e.attempts == 1));
    // What is claimed is not claimed again; a zero share takes nothing.
    let shares = [("a".to_owned(), 0), ("b".to_owned(), 5)];
    assert!(store
        .claim_apps("w", &shares, 1_000, T0 + 10)
        .await
        .unwrap()
        .is_empty());
    let rest = store
        .claim_apps("w", &[("a".to_owned(), 10)], 1_000, T0 + 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
}

/// An event's deliveries are created with it (one per route, none for a duplicate), claimed
/// per route with a lease, retried, dead, replayed and done.
async fn deliveries_fan_out_and_run_their_course(store: Arc<dyn Store>) {
    use dinghook::store::{DeliveryOutcome, DeliveryQuery, DeliveryReplay};
    let routed = |key: &str| NewEvent {
        routes: vec!["a".into(), "b".into()],
        ..event(key, "x", T0)
    };
    let Inserted::Stored { id } = store.insert(routed("e1")).await.unwrap() else {
        panic!("not stored")
    };
    assert!(matches!(
        store.insert(routed("e1")).await.unwrap(),
        Inserted::Duplicate { .. }
    ));
    let d = store.deliveries();
    let all = d.list_deliveries(&DeliveryQuery::default()).await.unwrap();
    assert_eq!(
        all.len(),
        2,
        "one per route, none for the duplicate: {all:?}"
    );
    assert!(all
        .iter()
        .all(|x| x.event_id == id && x.state == EventState::Pending));

    // Route a: claimed with its event, once.
    let claimed = d.claim_deliveries("a", "w1", 10, 1_000, T0).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (delivery, ev) = &claimed[0];
    assert_eq!(
        (delivery.route.as_str(), ev.id, delivery.attempts),
        ("a", id, 1)
    );
    assert!(d
        .claim_deliveries("a", "w2", 10, 1_000, T0)
        .await
        .unwrap()
        .is_empty());
    // Retry later; not due before.
    let retry = DeliveryOutcome::Retry {
        at: T0 + 100,
        error: "HTTP 503".into(),
        status: Some(503),
    };
    assert!(d
        .finish_delivery(delivery.id, "w1", &retry, T0)
        .await
        .unwrap());
    assert!(d
        .claim_deliveries("a", "w1", 10, 1_000, T0 + 50)
        .await
        .unwrap()
        .is_empty());
    let again = d
        .claim_deliveries("a", "w1", 10, 1_000, T0 + 100)
        .await
        .unwrap();
    assert_eq!(again[0].0.attempts, 2);
    let dead = DeliveryOutcome::Dead {
        error: "HTTP 400: no".into(),
        status: Some(400),
    };
    assert!(d
        .finish_delivery(delivery.id, "w1", &dead, T0 + 100)
        .await
        .unwrap());
    let got = d.get_delivery(delivery.id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.last_status, got.last_error.as_deref()),
        (EventState::Dead, Some(400), Some("HTTP 400: no"))
    );
    // Replayed: pending again, attempts reset; then done.
    let replay = DeliveryReplay::RouteState {
        route: "a".into(),
        state: EventState::Dead,
    };
    assert_eq!(d.replay_deliveries(&replay, T0 + 200).await.unwrap(), 1);
    let third = d
        .claim_deliveries("a", "w1", 10, 1_000, T0 + 200)
        .await
        .unwrap();
    assert_eq!(third[0].0.attempts, 1);
    let done = DeliveryOutcome::Done { status: Some(200) };
    assert!(d
        .finish_delivery(delivery.id, "w1", &done, T0 + 201)
        .await
        .unwrap());
    let got = d.get_delivery(delivery.id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.delivered_at),
        (EventState::Done, Some(T0 + 201))
    );

    // Route b: a lease that expires goes to another runner; the first cannot finish it.
    let b = d.claim_deliveries("b", "w1", 10, 1_000, T0).await.unwrap();
    let taken = d
        .claim_deliveries("b", "w2", 10, 1_000, T0 + 2_000)
        .await
        .unwrap();
    assert_eq!(taken[0].0.id, b[0].0.id);
    assert!(!d
        .finish_delivery(b[0].0.id, "w1", &done, T0 + 2_001)
        .await
        .unwrap());
    assert_eq!(d.release_deliveries("w2", T0 + 2_002).await.unwrap(), 1);
    assert_eq!(
        d.get_delivery(b[0].0.id).await.unwrap().unwrap().state,
        EventState::Pending
    );

    // Redelivery: a done delivery reset, a missing one created.
    let n = d
        .redeliver(id, "default", &["a".into(), "c".into()], T0 + 3_000)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let backlogs = d.route_backlogs(T0 + 4_000).await.unwrap();
    let pending: Vec<(String, u64)> = backlogs
        .iter()
        .map(|b| (b.route.clone(), b.pending))
        .collect();
    assert_eq!(
        pending,
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1)
        ]
    );
    assert_eq!(backlogs[0].oldest_due_age_ms, Some(1_000));
    let only_c = d
        .list_deliveries(&DeliveryQuery {
            route: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_c.len(), 1);

    // Pauses.
    d.pause_route("b", "410 Gone", T0).await.unwrap();
    d.pause_route("b", "by hand", T0 + 1).await.unwrap();
    let pauses = d.route_pauses().await.unwrap();
    assert_eq!(pauses.len(), 1);
    assert_eq!(
        (pauses[0].reason.as_str(), pauses[0].paused_at),
        ("by hand", T0 + 1)
    );
    assert!(d.resume_route("b").await.unwrap());
    assert!(!d.resume_route("b").await.unwrap());
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

/// Counts by app: every app's in `by_app`, one app's through `stats_for`, and an app's view
/// of the store (`scoped::for_app`) counts that app's events only, whatever it is asked.
async fn stats_by_app_and_through_an_apps_view(store: Arc<dyn Store>) {
    let ops = scoped::for_app(Arc::clone(&store), "ops");
    let crm = scoped::for_app(Arc::clone(&store), "crm");
    for (view, key, event_type, at) in [
        (&store, "d1", "chat_update_title", T0),
        (&store, "d2", "todo_task_create", T0 + 100),
        (&ops, "o1", "chat_update_title", T0 + 10),
        (&ops, "o2", "chat_update_title", T0 + 20),
        (&ops, "o3", "check_in", T0 + 300),
        (&crm, "c1", "check_in", T0 + 400),
    ] {
        let inserted = view.insert(event(key, event_type, at)).await.unwrap();
        assert!(matches!(inserted, Inserted::Stored { .. }), "{inserted:?}");
    }
    // The four oldest: d1 and o1 done, o2 dead, d2 retried later.
    let claimed = store.claim("w", 4, 60_000, T0 + 1_000).await.unwrap();
    let keys: Vec<&str> = claimed.iter().map(|e| e.dedup_key.as_str()).collect();
    assert_eq!(keys, ["d1", "@ops/o1", "@ops/o2", "d2"]);
    store
        .mark_done(claimed[0].id, "w", T0 + 1_000)
        .await
        .unwrap();
    store
        .mark_done(claimed[1].id, "w", T0 + 1_000)
        .await
        .unwrap();
    store
        .mark_dead(claimed[2].id, "w", "no", &[], T0 + 1_000)
        .await
        .unwrap();
    store
        .mark_retry(claimed[3].id, "w", T0 + 5_000, "later", &[], T0 + 1_000)
        .await
        .unwrap();

    let now = T0 + 10_000;
    let all = store.stats(now).await.unwrap();
    assert_eq!(all, store.stats_for(None, now).await.unwrap());
    let states = |stats: &dinghook::store::AppStats| -> Vec<(String, u64)> {
        stats
            .by_state
            .iter()
            .map(|(s, n)| (s.clone(), *n))
            .collect()
    };
    let expect = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = EventState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for (state, n) in pairs {
            all.iter_mut().find(|(s, _)| s == state).unwrap().1 = *n;
        }
        all.sort();
        all
    };
    assert_eq!(
        all.by_app.keys().map(String::as_str).collect::<Vec<_>>(),
        ["crm", "default", "ops"]
    );
    assert_eq!(
        states(&all.by_app["default"]),
        expect(&[("done", 1), ("retry", 1)])
    );
    assert_eq!(
        states(&all.by_app["ops"]),
        expect(&[("done", 1), ("dead", 1), ("pending", 1)])
    );
    assert_eq!(states(&all.by_app["crm"]), expect(&[("pending", 1)]));
    assert_eq!(all.by_state["done"], 2);
    assert_eq!(all.by_state["pending"], 2);
    assert_eq!(all.by_type["chat_update_title"]["done"], 2);
    // Each app's most overdue waiting event: d2's retry (due at T0 + 5 000), o3, c1.
    assert_eq!(all.by_app["default"].oldest_pending_age_ms, Some(5_000));
    assert_eq!(all.by_app["ops"].oldest_pending_age_ms, Some(10_000 - 300));
    assert_eq!(all.by_app["crm"].oldest_pending_age_ms, Some(10_000 - 400));
    assert_eq!(all.oldest_pending_age_ms, Some(10_000 - 300));

    let of_ops = store.stats_for(Some("ops"), now).await.unwrap();
    assert_eq!(of_ops.by_state, all.by_app["ops"].by_state);
    assert_eq!(of_ops.by_app.len(), 1);
    assert_eq!(of_ops.by_app["ops"], all.by_app["ops"]);
    assert_eq!(of_ops.oldest_pending_age_ms, Some(10_000 - 300));
    assert_eq!(of_ops.by_type["chat_update_title"].get("done"), Some(&1));
    assert_eq!(of_ops.by_type["chat_update_title"].get("dead"), Some(&1));
    assert_eq!(of_ops.by_type["check_in"].get("pending"), Some(&1));
    assert_eq!(of_ops.by_type.len(), 2, "{of_ops:?}");

    // The view counts its own app's events, asked for every app or for its own...
    assert_eq!(ops.stats(now).await.unwrap(), of_ops);
    assert_eq!(ops.stats_for(Some("ops"), now).await.unwrap(), of_ops);
    // ...and no other app's.
    let other = ops.stats_for(Some("crm"), now).await.unwrap();
    assert!(other.by_state.values().all(|n| *n == 0), "{other:?}");
    assert!(other.by_type.is_empty() && other.oldest_pending_age_ms.is_none());
    assert_eq!(crm.stats(now).await.unwrap().by_state["pending"], 1);

    // An app without events: zeros, and its name, so a caller can tell it was asked.
    let quiet = store.stats_for(Some("quiet"), now).await.unwrap();
    assert!(quiet.by_state.values().all(|n| *n == 0), "{quiet:?}");
    assert_eq!(quiet.by_app.keys().collect::<Vec<_>>(), ["quiet"]);
    assert_eq!(quiet.by_app["quiet"].by_state.len(), 5);
}

/// Rows of text (or NULL) from the store's database, for what no store call reads: the views.
async fn sql_rows(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    match url.strip_prefix("sqlite://") {
        Some(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut stmt = conn.prepare(sql).unwrap();
            let columns = stmt.column_count();
            let rows = stmt
                .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
                .unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        }
        None => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            if !sql.trim_start().starts_with("SELECT") {
                client.batch_execute(sql).await.unwrap();
                return Vec::new();
            }
            let rows = client.query(sql, &[]).await.unwrap();
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
                .collect()
        }
    }
}

/// The views `groups`, `todos` and `notifications` show every app's documents with their
/// app, on a database migrated before they did (migration 12) too: before it, the `ops`
/// app's group is not in `groups`; after it, it is, beside the `default` app's.
async fn views_show_every_apps_documents(store: Arc<dyn Store>, url: &str) {
    use serde_json::json;
    // The views as they were before migration 12 (stand-ins for migration 4's, of the same
    // names: migration 12 replaces them whatever they select).
    let version = match url.starts_with("sqlite://") {
        true => {
            "DROP TABLE deliveries; DROP TABLE route_pauses; \
                  DROP TRIGGER events_run_ended; DROP TABLE event_runs; PRAGMA user_version = 11;"
        }
        false => {
            "DROP TABLE deliveries; DROP TABLE route_pauses; \
                  DROP TRIGGER events_run_ended ON events; DROP TABLE event_runs; \
                  DELETE FROM dinghook_migrations WHERE version > 11;"
        }
    };
    let old_views = format!(
        "DROP VIEW groups; DROP VIEW todos; DROP VIEW notifications; \
         CREATE VIEW groups AS SELECT key AS open_conversation_id, updated_at \
             FROM documents WHERE collection = 'group'; \
         CREATE VIEW todos AS SELECT key AS task_id, updated_at \
             FROM documents WHERE collection = 'todo'; \
         CREATE VIEW notifications AS SELECT key AS task_id, updated_at \
             FROM documents WHERE collection = 'notification'; \
         {version}"
    );
    match url.strip_prefix("sqlite://") {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(&old_views)
            .unwrap(),
        None => {
            sql_rows(url, &old_views).await;
        }
    }
    let ops = scoped::for_app(Arc::clone(&store), "ops");
    let crm = scoped::for_app(Arc::clone(&store), "crm-2");
    let put = |view: &Arc<dyn Store>, collection: &'static str, key: &'static str, body| {
        let view = Arc::clone(view);
        async move {
            view.put_document(collection, key, &body, T0).await.unwrap();
        }
    };
    put(
        &store,
        "group",
        "cid-d",
        json!({"title": "Default's", "status": "installed"}),
    )
    .await;
    put(
        &ops,
        "group",
        "cid-o",
        json!({"title": "Ops's", "status": "uninstalled"}),
    )
    .await;
    put(&store, "todo", "t-d", json!({"subject": "Default's to-do"})).await;
    put(&ops, "todo", "t-o", json!({"subject": "Ops's to-do"})).await;
    put(
        &crm,
        "notification",
        "n-c",
        json!({"kind": "todo", "status": "sent"}),
    )
    .await;
    // Not in any view.
    put(&ops, "effect", "e-o", json!({"n": 1})).await;
    put(&store, "user", "u-d", json!({"userid": "u"})).await;
    let text = |rows: &[&[&str]]| -> Vec<Vec<Option<String>>> {
        rows.iter()
            .map(|r| r.iter().map(|c| Some((*c).to_owned())).collect())
            .collect()
    };
    let groups = "SELECT open_conversation_id FROM groups ORDER BY open_conversation_id";
    assert_eq!(sql_rows(url, groups).await, text(&[&["cid-d"]]), "before");
    store.close().await;

    let upgraded = open_url(url).await;
    assert_eq!(
        sql_rows(
            url,
            "SELECT app, open_conversation_id, title, status FROM groups \
             ORDER BY app, open_conversation_id"
        )
        .await,
        text(&[
            &["default", "cid-d", "Default's", "installed"],
            &["ops", "cid-o", "Ops's", "uninstalled"],
        ])
    );
    assert_eq!(
        sql_rows(url, "SELECT app, task_id, subject FROM todos ORDER BY app").await,
        text(&[
            &["default", "t-d", "Default's to-do"],
            &["ops", "t-o", "Ops's to-do"],
        ])
    );
    assert_eq!(
        sql_rows(url, "SELECT app, task_id, kind, status FROM notifications").await,
        text(&[&["crm-2", "n-c", "todo", "sent"]])
    );
    // One app's, as an operator asks.
    assert_eq!(
        sql_rows(url, "SELECT title FROM groups WHERE app = 'ops'").await,
        text(&[&["Ops's"]])
    );
    upgraded.close().await;
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

// --- PostgreSQL only ----------------------------------------------------------------------

/// Two replicas receive the same re-deliveries at the same moment: each key is stored once,
/// and both are told the same row id.
async fn two_replicas_store_each_dedup_key_once(a: Arc<dyn Store>, url: &str) {
    let b = open_url(url).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        for store in [Arc::clone(&a), Arc::clone(&b)] {
            tasks.push(tokio::spawn(async move {
                (
                    i,
                    store
                        .insert(event(&format!("dup{i}"), "x", T0 + i))
                        .await
                        .unwrap(),
                )
            }));
        }
    }
    let mut outcomes: std::collections::HashMap<i64, Vec<Inserted>> = Default::default();
    for t in tasks {
        let (i, inserted) = t.await.unwrap();
        outcomes.entry(i).or_default().push(inserted);
    }
    for (i, results) in outcomes {
        let stored: Vec<i64> = results
            .iter()
            .filter_map(|r| match r {
                Inserted::Stored { id } => Some(*id),
                Inserted::Duplicate { .. } => None,
            })
            .collect();
        assert_eq!(stored.len(), 1, "key dup{i}: {results:?}");
        let ids: HashSet<i64> = results
            .iter()
            .map(|r| match r {
                Inserted::Stored { id } | Inserted::Duplicate { id } => *id,
            })
            .collect();
        assert_eq!(ids.len(), 1, "key dup{i}: {results:?}");
    }
    assert_eq!(a.count().await.unwrap(), 100);
    b.close().await;
}

/// Workers on two replicas claim from one inbox at once: every event is claimed exactly once.
async fn two_replicas_claim_without_sharing(a: Arc<dyn Store>, url: &str) {
    let b = open_url(url).await;
    insert_n(&*a, 300, T0).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        tasks.push(tokio::spawn(async move {
            let owner = format!("replica{}-w{w}", w % 2);
            let mut mine = Vec::new();
            loop {
                let batch = store.claim(&owner, 5, 60_000, T0 + 500).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                for e in batch {
                    assert_eq!(e.attempts, 1, "event {} claimed before", e.id);
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
    assert_eq!(seen.len(), 300);
    assert_eq!(a.stats(T0 + 600).await.unwrap().by_state["done"], 300);
    b.close().await;
}

/// Replicas starting together on an empty database: the advisory lock makes them take turns,
/// so every one opens and the schema is there once.
async fn replicas_migrating_together(url: &str) {
    let opened = futures_join_all((0..4).map(|_| {
        let url = url.to_owned();
        tokio::spawn(async move { open_url(&url).await })
    }))
    .await;
    let first = &opened[0];
    first.insert(event("m", "x", T0)).await.unwrap();
    for store in &opened {
        assert_eq!(store.count().await.unwrap(), 1);
    }
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM dinghook_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // 1..=n without a gap or a repeat, whatever n this version has (6 or more).
    let expected: Vec<i32> = (1..=versions.len() as i32).collect();
    assert_eq!(versions, expected, "each migration recorded once");
    assert!(versions.len() >= 6, "{versions:?}");
    drop(client);
    let _ = connection.await;
    for store in opened {
        store.close().await;
    }
}

async fn futures_join_all<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await.unwrap());
    }
    out
}

/// The quota counter is shared: increments from two replicas at once all count.
async fn api_call_counter_shared_by_replicas(a: Arc<dyn Store>, url: &str) {
    let b = open_url(url).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        tasks.push(tokio::spawn(async move {
            store.add_api_calls("2026-11", 2).await.unwrap()
        }));
    }
    let mut totals: Vec<u64> = futures_join_all(tasks.into_iter()).await;
    totals.sort_unstable();
    assert_eq!(totals, (1..=50).map(|i| i * 2).collect::<Vec<u64>>());
    assert_eq!(b.api_calls("2026-11").await.unwrap(), 100);
    b.close().await;
}

/// How long a dead database may take to become an error (the callback's time-out is 10 s).
const FAIL_FAST: std::time::Duration = std::time::Duration::from_secs(6);

async fn unreachable_server_fails_fast() {
    let started = std::time::Instant::now();
    let config = dinghook::store::StoreConfig {
        url: "postgres://dinghook:s3cret-pw@127.0.0.1:1/dinghook".into(),
        ..Default::default()
    };
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        dinghook::store::open(&config),
    )
    .await
    .expect("open must not hang");
    let Err(e) = result else {
        panic!("opened a store on a closed port")
    };
    assert!(
        started.elapsed() < FAIL_FAST,
        "took {:?}",
        started.elapsed()
    );
    let message = e.to_string();
    assert!(!message.contains("s3cret-pw"), "password in {message}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
}

async fn silent_server_fails_fast() {
    // Accepts connections and never answers, like a hung server or a black-holed route.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        PostgresStore::open(&format!("postgres://postgres@{addr}/dinghook")),
    )
    .await
    .expect("open must not hang");
    assert!(result.is_err(), "opened a store on a silent server");
    assert!(
        started.elapsed() < FAIL_FAST,
        "took {:?}",
        started.elapsed()
    );
    held.abort();
}

/// A TCP relay in front of the real server that the test can freeze (bytes are held, sockets
/// stay open: a stuck server) or kill (every socket closed, new ones refused: a stopped one).
struct Relay {
    url: String,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    pipes: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(url: &str) -> Relay {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            other => panic!("the relay needs a TCP host, not {other:?}"),
        };
        let upstream = format!(
            "{host}:{}",
            config.get_ports().first().copied().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pipes: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let (frozen, pipes) = (Arc::clone(&frozen), Arc::clone(&pipes));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut pipes = pipes.lock().unwrap();
                    pipes.push(tokio::spawn(pipe(cr, sw, Arc::clone(&frozen))));
                    pipes.push(tokio::spawn(pipe(sr, cw, Arc::clone(&frozen))));
                }
            }
        });
        // The relay's address in the same URL (user, database, parameters kept).
        let scheme_end = url.find("://").unwrap() + 3;
        let rest = &url[scheme_end..];
        let user = rest.find('@').map_or("", |at| &rest[..=at]);
        let after_host = rest[user.len()..]
            .find(['/', '?'])
            .map_or("", |i| &rest[user.len() + i..]);
        Relay {
            url: format!("{}{user}{addr}{after_host}", &url[..scheme_end]),
            frozen,
            task,
            pipes,
        }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn kill(&self) {
        self.task.abort();
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn short_timeouts() -> PostgresOptions {
    PostgresOptions {
        operation_timeout: std::time::Duration::from_millis(1_500),
        statement_timeout: std::time::Duration::from_millis(1_000),
        pool_wait_timeout: std::time::Duration::from_millis(1_000),
        connect_timeout: std::time::Duration::from_millis(1_000),
        ..PostgresOptions::default()
    }
}

async fn server_stalling_after_open_times_out_then_recovers(url: &str) {
    let relay = Relay::start(url).await;
    let store = PostgresStore::open_with(&relay.url, short_timeouts())
        .await
        .unwrap();
    store.insert(event("before", "x", T0)).await.unwrap();

    relay.freeze(true);
    let started = std::time::Instant::now();
    let stuck = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.insert(event("during", "x", T0)),
    )
    .await
    .expect("insert must not hang");
    assert!(matches!(stuck, Err(StoreError::Timeout(_))), "{stuck:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // Other operations too, including those that would wait for a connection.
    assert!(store.probe().await.is_err());

    relay.freeze(false);
    // The stuck connections were thrown away; fresh ones work at once.
    store.insert(event("after", "x", T0)).await.unwrap();
    store.probe().await.unwrap();
    assert!(store.find_by_dedup_key("after").await.unwrap().is_some());
    store.close().await;
    relay.kill();
}

async fn server_going_away_after_open_errors_fast(url: &str) {
    let relay = Relay::start(url).await;
    let store = PostgresStore::open_with(&relay.url, short_timeouts())
        .await
        .unwrap();
    store.insert(event("before", "x", T0)).await.unwrap();
    relay.kill();
    for key in ["gone1", "gone2"] {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.insert(event(key, "x", T0)),
        )
        .await
        .expect("insert must not hang");
        assert!(result.is_err(), "stored {key} with the server gone");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(store.probe().await.is_err());
    store.close().await;
}

/// The DingTalk client counts its calls in the store: a new client on a reopened store (a
/// restart, or another replica) continues from the same total.
async fn client_counter_survives_restart(store: Arc<dyn Store>, url: &str) {
    use dinghook::app::StoreCallCounter;
    use dinghook::dingtalk::{Client, ClientConfig};
    let (fake, base) = fake_dingtalk::FakeDingTalk::spawn().await.unwrap();
    fake.add_user(serde_json::json!({"userid": "u1", "name": "Ada", "unionid": "un1"}));
    let config = ClientConfig {
        app_key: "dingkey".into(),
        app_secret: "secret".into(),
        oapi_url: base.clone(),
        api_url: base,
        ..ClientConfig::default()
    };
    let client = Client::new(
        config.clone(),
        Arc::new(StoreCallCounter(Arc::clone(&store))),
    )
    .unwrap();
    for _ in 0..3 {
        client.get_user("u1", None).await.unwrap();
    }
    assert_eq!(client.quota().await.used, 3);
    store.close().await;

    let reopened = open_url(url).await;
    let client = Client::new(config, Arc::new(StoreCallCounter(Arc::clone(&reopened)))).unwrap();
    let quota = client.quota().await;
    assert_eq!((quota.used, quota.remaining), (3, 4_997));
    client.get_user("u1", None).await.unwrap();
    assert_eq!(client.quota().await.used, 4);
    reopened.close().await;
}

async fn scheduled_events_wait_until_due(store: Arc<dyn Store>) {
    let ev = event("later", "dinghook_follow_up", T0);
    let Inserted::Stored { id } = store.schedule(ev.clone(), T0 + 60_000).await.unwrap() else {
        panic!("not stored")
    };
    assert!(store
        .claim("w", 10, 1_000, T0 + 59_999)
        .await
        .unwrap()
        .is_empty());
    // Scheduling the same key again is a duplicate and does not move the due time.
    assert_eq!(
        store.schedule(ev, T0).await.unwrap(),
        Inserted::Duplicate { id }
    );
    assert!(store
        .claim("w", 10, 1_000, T0 + 1)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .claim("w", 10, 1_000, T0 + 60_000)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn documents_put_get_insert_once_and_list(store: Arc<dyn Store>) {
    use serde_json::json;
    assert!(store.get_document("group", "cid1").await.unwrap().is_none());
    store
        .put_document("group", "cid1", &json!({"title": "a"}), T0)
        .await
        .unwrap();
    store
        .put_document("group", "cid1", &json!({"title": "b"}), T0 + 5)
        .await
        .unwrap();
    store
        .put_document("group", "cid2", &json!({"title": "c"}), T0 + 1)
        .await
        .unwrap();
    let doc = store.get_document("group", "cid1").await.unwrap().unwrap();
    assert_eq!(doc.body, json!({"title": "b"}));
    assert_eq!((doc.created_at, doc.updated_at), (T0, T0 + 5));
    assert!(
        store.get_document("todo", "cid1").await.unwrap().is_none(),
        "collections are separate"
    );
    let keys: Vec<String> = store
        .list_documents("group", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert_eq!(keys, ["cid1", "cid2"]);
    // An effect is recorded once, whoever tries first.
    assert!(store
        .insert_document("effect", "7/welcome", &json!({"n": 1}), T0)
        .await
        .unwrap());
    assert!(!store
        .insert_document("effect", "7/welcome", &json!({"n": 2}), T0)
        .await
        .unwrap());
    let effect = store
        .get_document("effect", "7/welcome")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(effect.body, json!({"n": 1}));
}

/// An operator's discard: of the ids given, only the events dead now go, with their runs and
/// deliveries, and the counts follow; a done event, a waiting one, an unknown id and an id
/// not given stay. Through an app's view, only that app's.
async fn discard_deletes_only_dead_events_among_the_ids(store: Arc<dyn Store>) {
    let at = T0;
    let dead = ended(
        &*store,
        NewEvent {
            routes: vec!["r".into()],
            ..event("discard-dead-1", "x", at)
        },
        EventState::Dead,
        at + 10,
    )
    .await;
    let dead_too = ended(
        &*store,
        event("discard-dead-2", "x", at),
        EventState::Dead,
        at + 10,
    )
    .await;
    let kept_dead = ended(
        &*store,
        event("discard-dead-3", "x", at),
        EventState::Dead,
        at + 10,
    )
    .await;
    let done = ended(
        &*store,
        event("discard-done", "x", at),
        EventState::Done,
        at + 10,
    )
    .await;
    let Inserted::Stored { id: waiting } = store
        .insert(event("discard-pending", "x", at + 20))
        .await
        .unwrap()
    else {
        panic!("a new key")
    };
    let other_app = ended(
        &*store,
        NewEvent {
            app: "ops".into(),
            ..event("@ops/discard-dead", "x", at)
        },
        EventState::Dead,
        at + 30,
    )
    .await;
    let before = store.stats(at + 100).await.unwrap();
    assert_eq!(store.discard(&[]).await.unwrap(), 0);
    // Through the ops app's view: the default app's dead events are not its to discard.
    let ops = dinghook::store::scoped::for_app(Arc::clone(&store), "ops");
    assert_eq!(ops.discard(&[dead, dead_too]).await.unwrap(), 0);
    assert_eq!(
        store
            .discard(&[dead, dead_too, done, waiting, 987_654_321])
            .await
            .unwrap(),
        2
    );
    for gone in [dead, dead_too] {
        assert!(store.get(gone).await.unwrap().is_none(), "{gone} is gone");
        assert!(
            store.runs(gone, 10).await.unwrap().is_empty(),
            "its runs too"
        );
    }
    let deliveries = store
        .deliveries()
        .list_deliveries(&dinghook::store::DeliveryQuery {
            event_id: Some(dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(deliveries.is_empty(), "its delivery too");
    for kept in [kept_dead, done, waiting, other_app] {
        assert!(store.get(kept).await.unwrap().is_some(), "{kept} stays");
    }
    assert_eq!(store.runs(done, 10).await.unwrap().len(), 1);
    let after = store.stats(at + 100).await.unwrap();
    assert_eq!(
        after.by_state["dead"],
        before.by_state["dead"] - 2,
        "the counts follow"
    );
    assert_eq!(after.by_state["done"], before.by_state["done"]);
    // Again: nothing left to discard among them.
    assert_eq!(store.discard(&[dead, dead_too]).await.unwrap(), 0);
    assert_eq!(ops.discard(&[other_app, kept_dead]).await.unwrap(), 1);
    assert!(store.get(kept_dead).await.unwrap().is_some());
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
            #[tokio::test] async fn client_counter_survives_restart() {
                let t = fresh(Backend::Sqlite).await.unwrap();
                super::client_counter_survives_restart(Arc::clone(&t.store), &t.url).await;
            }
            #[tokio::test] async fn views_show_every_apps_documents() {
                let t = fresh(Backend::Sqlite).await.unwrap();
                super::views_show_every_apps_documents(Arc::clone(&t.store), &t.url).await;
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
            #[tokio::test] async fn client_counter_survives_restart() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::client_counter_survives_restart(Arc::clone(&t.store), &t.url).await;
            }
            #[tokio::test] async fn views_show_every_apps_documents() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::views_show_every_apps_documents(Arc::clone(&t.store), &t.url).await;
            }
            // PostgreSQL only: several replicas (one pool each) on one database, and a
            // database that is down or stuck.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn two_replicas_store_each_dedup_key_once() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::two_replicas_store_each_dedup_key_once(t.store.clone(), &t.url).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn two_replicas_claim_without_sharing() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::two_replicas_claim_without_sharing(t.store.clone(), &t.url).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replicas_migrating_together() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::replicas_migrating_together(&url).await;
            }
            #[tokio::test]
            async fn api_call_counter_shared_by_replicas() {
                let Some(t) = fresh(Backend::Postgres).await else { return };
                super::api_call_counter_shared_by_replicas(t.store.clone(), &t.url).await;
            }
            // These two need no server: nothing listens on the first, the second never speaks.
            #[tokio::test]
            async fn unreachable_server_fails_fast() {
                super::unreachable_server_fails_fast().await;
            }
            #[tokio::test]
            async fn silent_server_fails_fast() {
                super::silent_server_fails_fast().await;
            }
            #[tokio::test]
            async fn server_stalling_after_open_times_out_then_recovers() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::server_stalling_after_open_times_out_then_recovers(&url).await;
            }
            #[tokio::test]
            async fn server_going_away_after_open_errors_fast() {
                let Some(url) = support::stores::fresh_postgres_database().await else { return };
                super::server_going_away_after_open_errors_fast(&url).await;
            }
        }
    };
}

for_each_backend!(
    insert_and_dedup,
    claim_with_lease,
    lease_expiry_returns_events,
    retry_then_dead_then_replay,
    runs_are_recorded_as_they_end,
    prune_deletes_what_retention_allows,
    handled_kept_by_retry_dead_replay_and_release_cleared_by_done,
    replay_by_ids_and_since_leaves_running_alone,
    concurrent_claimers_never_share,
    claim_apps_takes_each_apps_share,
    deliveries_fan_out_and_run_their_course,
    stats_count_states_types_and_age,
    stats_by_app_and_through_an_apps_view,
    scheduled_events_wait_until_due,
    documents_put_get_insert_once_and_list,
    discard_deletes_only_dead_events_among_the_ids,
);
