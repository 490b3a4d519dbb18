//! Durability with real processes: every acknowledged event survives SIGKILL.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinghook::store::sqlite::SqliteStore;
use dinghook::store::Store;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let port = free_port();
    let mut server = ServerProcess::start(&db, port, &[]).await;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = server.url("/dingtalk/callback");
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (acked, stop, next, client, url) = (
            Arc::clone(&acked),
            Arc::clone(&stop),
            Arc::clone(&next),
            client.clone(),
            url.clone(),
        );
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = format!("kill-{}", next.fetch_add(1, Ordering::Relaxed));
                let msg = format!(r#"{{"EventType":"x","eventId":"{id}"}}"#);
                // Only a complete, valid reply counts as an acknowledgement.
                if deliver(&client, &url, &msg).await {
                    acked.lock().unwrap().push(id);
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    // Kill while requests are in flight.
    while acked.lock().unwrap().len() < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = next.load(Ordering::Relaxed);
    assert!(
        acked.len() >= 300 && sent > acked.len(),
        "acked {} of {sent}",
        acked.len()
    );

    // Restart on the same file: every acknowledged event is there.
    let mut server = ServerProcess::start(&db, free_port(), &[]).await;
    let store = SqliteStore::open(&db, 16).await.unwrap();
    for id in &acked {
        assert!(
            store
                .find_by_dedup_key(&format!("event:{id}"))
                .await
                .unwrap()
                .is_some(),
            "acknowledged event {id} was lost"
        );
    }
    // Unacknowledged ones may or may not be there, but nothing beyond what was sent.
    let count = store.count().await.unwrap();
    assert!(
        count as usize >= acked.len() && count as usize <= sent,
        "{count}"
    );
    // And the restarted server serves.
    let sealed = seal(&sender(), r#"{"EventType":"x","eventId":"after-restart"}"#);
    let r = client
        .post(format!(
            "{}?{}",
            server.url("/dingtalk/callback"),
            sealed.query()
        ))
        .body(sealed.body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    store.close().await;
    let status = server.terminate().await;
    assert!(status.success(), "graceful exit: {status}");
}
