//! The real nginx, configured by `deploy/nginx/dinghook.conf` as shipped, in front of two real
//! `dinghook serve` replicas on one PostgreSQL database, with the built-in handlers sending
//! their group messages to a fake DingTalk. Events go through nginx while one replica is
//! SIGKILLed and later restarted on its port; every acknowledged event must be stored once and
//! handled once. Then the client addresses in the replicas' logs: taken from X-Forwarded-For
//! only when the peer is a trusted proxy.
//!
//! Needs nginx (Debian's `nginx-light`; `.ci/run` installs it) and `DINGHOOK_TEST_PG_URL`;
//! without either it prints `SKIPPED` and passes.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_dingtalk::FakeDingTalk;
use support::*;

const TEST: &str = "nginx_in_front_of_two_replicas_loses_and_repeats_nothing";
/// Events sent through nginx.
const EVENTS: usize = 3000;
/// Senders, each at most one request per `PACE`: about 400 requests/s, so the phases (both
/// up, one killed, restarted) each last seconds, not milliseconds.
const SENDERS: usize = 40;
const PACE: Duration = Duration::from_millis(100);
/// Kill replica A after this many acknowledgements; restart it after this many.
const KILL_AT: usize = 1000;
const RESTART_AT: usize = 1800;
const APP_SECRET: &str = "nginx-test-app-secret-5be1c9";

fn nginx_binary() -> Option<PathBuf> {
    if let Ok(out) = Command::new("sh").args(["-c", "command -v nginx"]).output() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !path.is_empty() {
            return Some(PathBuf::from(path));
        }
    }
    let sbin = PathBuf::from("/usr/sbin/nginx");
    sbin.exists().then_some(sbin)
}

/// `text` with `from` replaced by `to`, which must occur exactly once: if the shipped config
/// changes shape, the test says so instead of testing something else.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "deploy/nginx/dinghook.conf should contain {from:?} exactly once"
    );
    text.replacen(from, to, 1)
}

/// nginx as a child process with everything (config, pid, logs, temp files) in `dir`.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, port: u16, replicas: [u16; 2]) -> Nginx {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/dinghook.conf"),
        )
        .expect("deploy/nginx/dinghook.conf");
        let mut site = replace_once(
            &shipped,
            "server 127.0.0.1:8081 ",
            &format!("server 127.0.0.1:{} ", replicas[0]),
        );
        site = replace_once(
            &site,
            "server 127.0.0.1:8082 ",
            &format!("server 127.0.0.1:{} ", replicas[1]),
        );
        site = replace_once(
            &site,
            "    listen 80;",
            &format!("    listen 127.0.0.1:{port};"),
        );
        site = replace_once(
            &site,
            "/var/log/nginx/dinghook.access.log",
            &dir.join("access.log").display().to_string(),
        );
        std::fs::write(dir.join("dinghook.conf"), site).expect("write site");
        let d = dir.display();
        // Debian's nginx.conf in miniature: the site is included in `http` as in conf.d/.
        // As root, the workers would otherwise run as nobody and could not use `dir`.
        let main = format!(
            "user root;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
                 access_log off;\n\
                 client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n\
                 scgi_temp_path {d}/scgi;\n\
                 include {d}/dinghook.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr log");
        let child = Command::new(binary)
            .arg("-p")
            .arg(format!("{d}/"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            dir: dir.to_owned(),
            port,
        };
        nginx.wait_listening();
        nginx
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "nginx did not start ({exited:?}):\n{}\n{}",
                    self.read("stderr.log"),
                    self.read("error.log")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM (fast shutdown: the master stops its workers), then SIGKILL if it hangs.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn install(n: usize) -> String {
    serde_json::json!({
        "EventType": "im_cool_app_install", "CorpId": "dingcorp",
        "eventId": format!("nginx-{n}"), "coolAppCode": "COOLAPP-1-1018", "robotCode": "rNginx",
        "openConversationId": format!("cid-nginx-{n}"), "openConversationCorpId": "dingcorp",
        "operator": "0213454", "operateTime": "1641866135051"
    })
    .to_string()
}

async fn start_replica(
    dir: &Path,
    store_url: &str,
    fake: &str,
    config: &Path,
    port: u16,
) -> ServerProcess {
    let config = config.display().to_string();
    ServerProcess::start_program(
        env!("CARGO_BIN_EXE_dinghook"),
        &["serve"],
        dir,
        port,
        &[
            ("DINGHOOK_CONFIG", config.as_str()),
            ("DINGHOOK_STORE_URL", store_url),
            ("DINGHOOK_TRUSTED_PROXIES", "127.0.0.1/32"),
            ("DINGHOOK_APP_KEY", "dingnginxtest"),
            ("DINGHOOK_APP_SECRET", APP_SECRET),
            ("DINGHOOK_DINGTALK_OAPI_URL", fake),
            ("DINGHOOK_DINGTALK_API_URL", fake),
            ("DINGHOOK_DINGTALK_QPS", "100000"),
            ("DINGHOOK_DINGTALK_MONTHLY_QUOTA", "100000000"),
            ("DINGHOOK_RECOVERY", "off"),
            // A killed replica's claims come back to the others after 6 s. A run gets 4 s:
            // generous, since the machine may be busy with more than this test.
            ("DINGHOOK_LEASE", "6s"),
            ("DINGHOOK_HANDLER_TIMEOUT", "4s"),
            ("DINGHOOK_POLL_INTERVAL", "100ms"),
            ("DINGHOOK_RETRY_SCHEDULE", "200ms,200ms,200ms"),
        ],
    )
    .await
}

/// The value of one Prometheus sample line, 0 if absent (or the replica unreachable).
async fn metric(client: &reqwest::Client, replica: &ServerProcess, sample: &str) -> u64 {
    let Ok(response) = client.get(replica.ops_url("/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const GROUP_MESSAGES: &str =
    r#"dinghook_notifications_sent_total{app="default",kind="group_message"}"#;
const STORED: &str = r#"dinghook_events_received_total{app="default",event_type="im_cool_app_install",outcome="stored"}"#;

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// A URL check with the given source address and X-Forwarded-For; true if answered 200.
async fn url_check(url: &str, from: &str, forwarded_for: &str) -> bool {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().ok())
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let sealed = seal(&sender(), r#"{"EventType":"check_url"}"#);
    client
        .post(format!("{url}?{}", sealed.query()))
        .header("x-forwarded-for", forwarded_for)
        .body(sealed.body())
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// The request `id=` and `client=` of every "answered DingTalk URL check" line in `logs`.
fn url_checks(logs: &str) -> Vec<(String, String)> {
    let field = |line: &str, name: &str| {
        line.split(&format!(" {name}="))
            .nth(1)
            .or_else(|| line.split(&format!("{{{name}=")).nth(1))
            .and_then(|rest| rest.split(['}', ' ']).next())
            .unwrap_or("(none)")
            // A string field is printed quoted.
            .trim_matches('"')
            .to_owned()
    };
    logs.lines()
        .filter(|line| line.contains("answered DingTalk URL check"))
        .map(|line| (field(line, "id"), field(line, "client")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_in_front_of_two_replicas_loses_and_repeats_nothing() {
    let Some(nginx_bin) = nginx_binary() else {
        eprintln!("SKIPPED {TEST}: nginx is not installed (apt-get install nginx-light)");
        return;
    };
    let Some(store_url) = stores::fresh_postgres_database().await else {
        eprintln!("SKIPPED {TEST}: DINGHOOK_TEST_PG_URL is not set");
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let (fake, fake_url) = FakeDingTalk::spawn().await.expect("fake DingTalk");
    // One DingTalk call per event: the welcome message, sent once per event (effect_once).
    let config = dir.path().join("replica.toml");
    std::fs::write(
        &config,
        "[handlers.cool_app]\nlookup_title = false\nwelcome = true\n",
    )
    .expect("replica config");
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_replica(dir.path(), &store_url, &fake_url, &config, port_a).await;
    let b = start_replica(dir.path(), &store_url, &fake_url, &config, port_b).await;
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = Nginx::start(&nginx_bin, &nginx_dir, free_port(), [port_a, port_b]);
    let callback = nginx.url("/dingtalk/callback");

    // Senders: each takes the next event number and posts it through nginx, at most once per
    // PACE. Nothing is re-sent: an event that failed is counted and left alone.
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let failed: Arc<Mutex<Vec<usize>>> = Arc::default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (next, acked, failed, client, callback) = (
            Arc::clone(&next),
            Arc::clone(&acked),
            Arc::clone(&failed),
            client.clone(),
            callback.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                pace.tick().await;
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= EVENTS {
                    return;
                }
                if deliver(&client, &callback, &install(n)).await {
                    acked.lock().unwrap().push(n);
                } else {
                    failed.lock().unwrap().push(n);
                }
            }
        }));
    }
    let acked_count = || acked.lock().unwrap().len();
    let wait_acked = |n: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked_count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} acknowledgements",
                acked_count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    // Phase 1: both replicas up. Then SIGKILL A in the middle of the load.
    wait_acked(KILL_AT).await;
    let metrics_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let a_first_sent = metric(&metrics_client, &a, GROUP_MESSAGES).await;
    let a_first_stored = metric(&metrics_client, &a, STORED).await;
    let a_pid = a.child.id().expect("replica A runs");
    a.kill().await;
    // What A had claimed and not finished: these wait for their lease to run out, then run
    // elsewhere. Nobody else can touch them before then, so this list is exact once
    // PostgreSQL has finished the statements A sent just before it died.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = pg(&store_url).await;
    let taken_over: HashSet<String> = db
        .query(
            "SELECT dedup_key FROM events WHERE state = 'running' AND lease_owner LIKE $1",
            &[&format!("{a_pid}-%")],
        )
        .await
        .expect("query A's leases")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let acked_at_kill = acked_count();

    // Phase 2: B alone (nginx finds A refusing and retries on B). Then A comes back.
    wait_acked(RESTART_AT).await;
    let a = start_replica(dir.path(), &store_url, &fake_url, &config, port_a).await;
    let acked_at_restart = acked_count();

    // Phase 3: both again, until every event was sent.
    for s in senders {
        s.await.expect("sender");
    }
    let acked: Vec<usize> = acked.lock().unwrap().clone();
    let failed: Vec<usize> = failed.lock().unwrap().clone();
    assert_eq!(acked.len() + failed.len(), EVENTS);
    let all_sent = started.elapsed();

    // Everything stored is handled: no event left waiting, retrying, running or dead.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .query_one(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE state <> 'done') FROM events",
                &[],
            )
            .await
            .expect("count events");
        let (total, unfinished): (i64, i64) = (row.get(0), row.get(1));
        if unfinished == 0 && total as usize >= acked.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unfinished} of {total} events unfinished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_done = started.elapsed();
    let rows = db
        .query(
            "SELECT dedup_key, state, attempts, last_error FROM events",
            &[],
        )
        .await
        .expect("events");
    let stored: HashMap<String, (String, i64, Option<String>)> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    assert_eq!(stored.len(), rows.len());

    // Every acknowledged event is stored (once: the key is unique) and done: none lost.
    let lost: Vec<&usize> = acked
        .iter()
        .filter(|n| !stored.contains_key(&format!("event:nginx-{n}")))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    // Nothing stored that was never sent.
    let sent: HashSet<String> = (0..EVENTS).map(|n| format!("event:nginx-{n}")).collect();
    assert!(stored.keys().all(|k| sent.contains(k)));

    // Handled once: one group message per event, and one claim unless a run failed (its error
    // is kept) or A died holding it. Those A held were taken over after their lease; their
    // message is still sent once, unless the kill fell between DingTalk's answer and the
    // record of the effect: the window no handler can close (DingTalk's send has no
    // idempotency key), counted here, not hidden.
    let mut messages: HashMap<String, usize> = HashMap::new();
    for m in fake.robot_messages() {
        let ocid = m["openConversationId"].as_str().unwrap_or_default();
        *messages.entry(ocid.to_owned()).or_default() += 1;
    }
    let mut resent_in_kill_window = 0;
    let mut rerun_after_failure = 0;
    let mut wrong = Vec::new();
    for (key, (state, attempts, error)) in &stored {
        let ocid = key.replace("event:nginx-", "cid-nginx-");
        let sends = messages.get(&ocid).copied().unwrap_or(0);
        if *attempts > 1 && error.is_some() {
            rerun_after_failure += 1;
        }
        let ok = if taken_over.contains(key) {
            resent_in_kill_window += sends.saturating_sub(1);
            *attempts >= 2 && (1..=2).contains(&sends)
        } else {
            (*attempts == 1 || error.is_some()) && sends == 1
        };
        if state != "done" || !ok {
            wrong.push(format!(
                "{key}: {state}, {attempts} claims, {sends} messages, taken over: {}, \
                 last error: {error:?}",
                taken_over.contains(key)
            ));
        }
    }
    if !wrong.is_empty() {
        let logs: String = [&a.log, &b.log]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let warnings: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect();
        panic!(
            "{} events not handled exactly once:\n{}\nwarnings:\n{}",
            wrong.len(),
            wrong.join("\n"),
            warnings.join("\n")
        );
    }
    assert_eq!(
        messages.values().sum::<usize>(),
        stored.len() + resent_in_kill_window,
        "messages to groups no event was stored for"
    );

    // Both replicas did the work, A in both of its lives, and nginx brought A back.
    let b_sent = metric(&metrics_client, &b, GROUP_MESSAGES).await;
    let a_second_sent = metric(&metrics_client, &a, GROUP_MESSAGES).await;
    let a_second_stored = metric(&metrics_client, &a, STORED).await;
    let b_stored = metric(&metrics_client, &b, STORED).await;
    assert!(
        a_first_stored > 0 && a_first_sent > 0,
        "A idle before the kill"
    );
    assert!(b_stored > 0 && b_sent > 0, "B idle");
    assert!(
        a_second_stored > 0 && a_second_sent > 0,
        "A got no traffic after its restart"
    );

    // nginx retried on B the requests it had sent to the dead A: its access log shows both
    // replicas tried for one request, answered 200.
    let access = nginx.read("access.log");
    let both = format!("upstream=127.0.0.1:{port_a}, 127.0.0.1:{port_b} ");
    let retried = access
        .lines()
        .filter(|l| l.contains(&both) && l.contains("\" 200 "))
        .count();
    assert!(retried > 0, "no request retried on B:\n{access}");
    let non_200 = access
        .lines()
        .filter(|l| l.contains("/dingtalk/callback") && !l.contains("\" 200 "))
        .count();
    // Requests that nginx could not place (both tries failed within 2 s) reach the client as
    // errors and are DingTalk's to retry; a replica dying must not cause them in numbers.
    assert!(
        failed.len() <= EVENTS / 100,
        "{} of {EVENTS} requests failed: {failed:?}",
        failed.len()
    );

    // Client addresses. Through nginx from 127.0.0.1 (trusted, like a load balancer in front)
    // with X-Forwarded-For 203.0.113.7: nginx appends 127.0.0.1, the replica sees nginx
    // (trusted) and walks the list: the client is 203.0.113.7.
    for _ in 0..3 {
        assert!(url_check(&callback, "127.0.0.1", "203.0.113.7").await);
    }
    // Through nginx from 127.0.0.3 (not trusted) with a forged entry: nginx appends
    // 127.0.0.3, which is where the walk stops.
    for _ in 0..3 {
        assert!(url_check(&callback, "127.0.0.3", "198.51.100.9").await);
    }
    // Straight to a replica from 127.0.0.2 (not trusted) with a forged header: the peer.
    for _ in 0..3 {
        assert!(url_check(&b.url("/dingtalk/callback"), "127.0.0.2", "198.51.100.9").await);
    }
    let logs: String = [&a.log, &b.log]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let checks = url_checks(&logs);
    let mut clients: Vec<&str> = checks.iter().map(|(_, c)| c.as_str()).collect();
    clients.sort_unstable();
    assert_eq!(
        clients,
        [
            "127.0.0.2",
            "127.0.0.2",
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.3",
            "127.0.0.3",
            "203.0.113.7",
            "203.0.113.7",
            "203.0.113.7"
        ],
        "client addresses of the URL checks"
    );
    assert!(
        !logs.contains("198.51.100.9"),
        "a forged address was logged"
    );
    // The replicas kept nginx's request id: the same id in both logs.
    let access = nginx.read("access.log");
    for (id, client) in &checks {
        if client != "127.0.0.2" {
            assert!(
                access.contains(&format!(" rid={id} ")),
                "{id} not in:\n{access}"
            );
        }
    }

    // No secret in any log: the replicas', nginx's error and access logs.
    let everything = format!(
        "{logs}\n{access}\n{}\n{}",
        nginx.read("error.log"),
        nginx.read("stderr.log")
    );
    for secret in [TOKEN, AES_KEY, APP_SECRET] {
        assert!(!everything.contains(secret), "a secret is in the logs");
    }

    eprintln!(
        "nginx: events={EVENTS} acked={} non_200={} (access log: {non_200}) \
         retried_on_other_replica={retried} kills=1 restarts=1 acked_at_kill={acked_at_kill} \
         acked_at_restart={acked_at_restart} taken_over_after_kill={} \
         resent_in_kill_window={resent_in_kill_window} rerun_after_failure={rerun_after_failure} \
         duplicates_stored=0 lost=0 \
         group_messages: a_before_kill={a_first_sent} a_after_restart={a_second_sent} b={b_sent} \
         stored: a_before_kill={a_first_stored} a_after_restart={a_second_stored} b={b_stored} \
         sent_by={:.1}s done_by={:.1}s elapsed={:.1}s",
        acked.len(),
        failed.len(),
        taken_over.len(),
        all_sent.as_secs_f64(),
        all_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(nginx);
    drop((a, b));
}

/// The numbers the deploy files share with dinghook and with each other, so that changing one
/// side without the other fails here (no nginx or Docker needed).
#[test]
fn deploy_files_agree_with_dinghook_and_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let site = std::fs::read_to_string(root.join("deploy/nginx/dinghook.conf")).expect("site");
    let compose = std::fs::read_to_string(root.join("deploy/docker-compose.yml")).expect("compose");
    let directive = |name: &str| -> Vec<String> {
        site.lines()
            .map(str::trim)
            .filter(|l| l.starts_with(&format!("{name} ")) && l.ends_with(';'))
            .map(|l| l[name.len()..].trim().trim_end_matches(';').to_owned())
            .collect()
    };

    // nginx's 1m is dinghook's default body limit.
    assert_eq!(directive("client_max_body_size"), ["1m"]);
    assert_eq!(
        dinghook::config::Config::default().callback.body_limit,
        1024 * 1024
    );
    // The retry of a POST is there, and bounded.
    assert_eq!(
        directive("proxy_next_upstream"),
        ["error timeout non_idempotent"]
    );
    assert_eq!(directive("proxy_next_upstream_tries"), ["2"]);
    assert_eq!(directive("proxy_http_version"), ["1.1"]);
    assert!(site.contains("proxy_set_header Connection \"\";"));
    assert!(site.contains("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"));

    // The replicas nginx knows are the ones compose starts, with health checks on the same
    // ports, trusting the address nginx connects from.
    let servers = directive("server");
    assert_eq!(servers.len(), 2, "{servers:?}");
    for (server, port) in servers.iter().zip(["8081", "8082"]) {
        assert!(
            server.starts_with(&format!("127.0.0.1:{port} ")),
            "{server}"
        );
        assert!(
            compose.contains(&format!("DINGHOOK_LISTEN: 127.0.0.1:{port}\n")),
            "compose listens on {port}"
        );
        assert!(
            compose.contains(&format!("\"http://127.0.0.1:{port}/healthz\"")),
            "compose health check on {port}"
        );
    }
    assert!(compose.contains("DINGHOOK_TRUSTED_PROXIES: 127.0.0.1/32\n"));
    assert!(compose.contains("network_mode: service:nginx\n"));
    assert!(compose.contains("./nginx/dinghook.conf:/etc/nginx/conf.d/default.conf:ro"));
    assert!(compose.contains("DINGHOOK_STORE_URL: postgres://"));
}
