//! Real processes with test handlers: two replicas on one PostgreSQL database, and a SIGKILL in
//! the middle of a load. The server processes are this test binary itself, re-run with the
//! ignored `child_server` test, which builds a dinghook application whose handler records its
//! runs and effects in files.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinghook::handler::{HandlerError, Registrations};
use support::*;

/// The child: a server whose handler appends every run to `runs.log` and records its effect
/// once per event, as a file created with `create_new` (the idempotency record a real handler
/// keeps in its store).
#[tokio::test]
#[ignore = "started as a child process by the other tests in this file"]
async fn child_server() {
    let Ok(dir) = std::env::var("DINGHOOK_CHILD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let delay: u64 = std::env::var("DINGHOOK_CHILD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    dinghook::telemetry::init(dinghook::telemetry::LogFormat::Text, "info");
    let config = dinghook::config::Config::load(None).expect("config from the environment");
    let app = dinghook::app::Application::builder(config)
        .on_chat_update_title(move |rename, ctx| {
            let dir = dir.clone();
            async move {
                let key = ctx.record.dedup_key.replace(':', "_");
                append(
                    &dir.join("runs.log"),
                    &format!("{key} {}\n", std::process::id()),
                )?;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let effect = dir.join("effects").join(&key);
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&effect)
                {
                    Ok(file) => {
                        use std::io::Write;
                        let mut file = file;
                        file.write_all(rename.title.as_bytes())
                            .map_err(HandlerError::transient)?;
                        file.sync_all().map_err(HandlerError::transient)?;
                    }
                    // Recorded by an earlier run that did not live to mark the event done.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(HandlerError::transient(e)),
                }
                Ok(())
            }
        })
        .build()
        .await
        .expect("build");
    app.run_until_stopped(dinghook::app::shutdown_signal())
        .await
        .expect("serve");
}

fn append(path: &Path, line: &str) -> Result<(), HandlerError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(HandlerError::transient)?;
    file.write_all(line.as_bytes())
        .map_err(HandlerError::transient)
}

async fn start_child(
    dir: &Path,
    store_url: &str,
    port: u16,
    extra: &[(&str, &str)],
) -> ServerProcess {
    let exe = std::env::current_exe().expect("test binary");
    let dir_str = dir.display().to_string();
    let mut env = vec![
        ("DINGHOOK_CHILD_DIR", dir_str.as_str()),
        ("DINGHOOK_STORE_URL", store_url),
        ("DINGHOOK_POLL_INTERVAL", "50ms"),
        ("DINGHOOK_RETRY_SCHEDULE", "100ms,100ms,100ms"),
    ];
    env.extend_from_slice(extra);
    ServerProcess::start_program(
        exe,
        &[
            "child_server",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
        dir,
        port,
        &env,
    )
    .await
}

fn effects(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir.join("effects"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn runs(dir: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("runs.log")).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        if let Some(key) = line.split_whitespace().next() {
            *counts.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

fn rename(id: &str) -> String {
    format!(r#"{{"EventType":"chat_update_title","eventId":"{id}","title":"t{id}"}}"#)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_handle_each_twice_delivered_event_once() {
    let Some(url) = stores::fresh_postgres_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("effects")).unwrap();
    let (a, b) = (
        start_child(dir.path(), &url, free_port(), &[]).await,
        start_child(dir.path(), &url, free_port(), &[]).await,
    );
    let urls = Arc::new([a.url("/dingtalk/callback"), b.url("/dingtalk/callback")]);
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (urls, client, next) = (Arc::clone(&urls), client.clone(), Arc::clone(&next));
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= 4000 {
                    return;
                }
                // Delivery n/2 of event n/2: the first to one replica, the second to either.
                let id = format!("r{}", n / 2);
                let target = if n % 2 == 0 { n / 2 % 2 } else { (n / 7) % 2 };
                assert!(
                    deliver(&client, &urls[target], &rename(&id)).await,
                    "{id} not acknowledged"
                );
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    wait_until("2000 effects", Duration::from_secs(60), || {
        effects(dir.path()).len() == 2000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = runs(dir.path());
    assert_eq!(runs.len(), 2000);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("effects")).unwrap();
    let url = format!("sqlite://{}", dir.path().join("data/dinghook.db").display());
    // Slow handlers (300 ms each) and a short lease: when the process dies, events are mid-run.
    let extra = [
        ("DINGHOOK_CHILD_DELAY_MS", "300"),
        ("DINGHOOK_LEASE", "2s"),
        ("DINGHOOK_HANDLER_TIMEOUT", "1s"),
    ];
    let mut first = start_child(dir.path(), &url, free_port(), &extra).await;
    let target = Arc::new(Mutex::new(first.url("/dingtalk/callback")));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (target, acked, next, stop, client) = (
            Arc::clone(&target),
            Arc::clone(&acked),
            Arc::clone(&next),
            Arc::clone(&stop),
            client.clone(),
        );
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = format!("k{}", next.fetch_add(1, Ordering::Relaxed));
                let url = target.lock().unwrap().clone();
                if deliver(&client, &url, &rename(&id)).await {
                    acked.lock().unwrap().push(id);
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    wait_until("400 acknowledgements", Duration::from_secs(30), || {
        acked.lock().unwrap().len() >= 400
    })
    .await;
    // Kill only while the process holds leased events in the middle of their 300 ms run, so
    // the restarted process has something to take over.
    let db = dir.path().join("data/dinghook.db");
    wait_until(
        "events running in the first process",
        Duration::from_secs(30),
        || {
            rusqlite::Connection::open(&db)
                .and_then(|c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM events WHERE state = 'running'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .is_ok_and(|n| n > 0)
        },
    )
    .await;
    first.kill().await;
    let handled_before = effects(dir.path()).len();
    let second = start_child(dir.path(), &url, free_port(), &extra).await;
    *target.lock().unwrap() = second.url("/dingtalk/callback");
    let resume = acked.lock().unwrap().len();
    wait_until(
        "more acknowledgements after the restart",
        Duration::from_secs(30),
        || acked.lock().unwrap().len() >= resume + 200,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let expected: HashSet<String> = acked.iter().map(|id| format!("event_{id}")).collect();
    wait_until(
        "every acknowledged event handled",
        Duration::from_secs(60),
        || expected.is_subset(&effects(dir.path())),
    )
    .await;
    assert!(
        handled_before < acked.len(),
        "the kill came before the backlog was handled"
    );
    // Effects are recorded once per event even where a run was repeated after the crash.
    let runs = runs(dir.path());
    let effects = effects(dir.path());
    assert!(effects.len() <= next.load(Ordering::Relaxed));
    for key in &expected {
        assert!(runs.get(key).copied().unwrap_or(0) >= 1, "{key} never ran");
    }
    // Events the killed process was running were picked up again by the new one after their
    // lease ended: they ran in both processes, and their effect was still recorded once.
    let text = std::fs::read_to_string(dir.path().join("runs.log")).unwrap();
    let mut pids: HashMap<&str, HashSet<&str>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(key), Some(pid)) = (parts.next(), parts.next()) {
            pids.entry(key).or_default().insert(pid);
        }
    }
    let rerun = pids.values().filter(|p| p.len() > 1).count();
    assert!(
        rerun > 0,
        "no event held by the killed process was run again"
    );
    drop(second);
}
