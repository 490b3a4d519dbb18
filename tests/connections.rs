//! The public port against hostile connections, from outside: the real binary, real sockets.
//! Idle and slow sockets beyond the open-file limit, a flood of unauthenticated bodies, and a
//! shutdown with a half-sent request (docs/reliability.md, "Hostile clients").

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::{deliver, free_port, ServerProcess};

/// The server's open-file limit in these tests: the common default soft limit.
const NOFILE: u32 = 1024;
/// DingTalk counts a push as failed when the reply takes longer than this.
const DINGTALK_WAIT: Duration = Duration::from_millis(1500);

/// `dinghook serve` under `ulimit -n 1024` (soft and hard, so raising it does not help).
async fn start_limited(dir: &std::path::Path, env: &[(&str, &str)]) -> ServerProcess {
    let db = dir.join("data").join("dinghook.db");
    let url = format!("sqlite://{}", db.display());
    let mut all = vec![("DINGHOOK_STORE_URL", url.as_str())];
    all.extend_from_slice(env);
    let script = format!("ulimit -n {NOFILE} && exec \"$0\" serve");
    ServerProcess::start_program(
        "bash",
        &["-c", &script, env!("CARGO_BIN_EXE_dinghook")],
        dir,
        free_port(),
        &all,
    )
    .await
}

fn pid(server: &ServerProcess) -> u32 {
    server.child.id().expect("running")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A connection to `port` from the loopback address `127.0.0.<host>`.
async fn connect_from(host: u8, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// True once the server has closed `stream` (EOF or reset); false if it is still open after
/// `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or other reply before the close: keep reading to the close.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn metric(client: &reqwest::Client, server: &ServerProcess, sample: &str) -> f64 {
    let text = client
        .get(server.ops_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// 2 000 idle and slow sockets (twice the server's open-file limit, from eight addresses,
/// one of them the callbacks' own) do not keep valid callbacks out: each is answered within
/// DingTalk's 1.5 s, the server never runs out of descriptors, and once the header timeout has
/// passed every one of the attacker's sockets has been closed.
#[tokio::test]
async fn idle_and_slow_sockets_beyond_the_file_limit_do_not_keep_callbacks_out() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    // Long enough that all 2 000 sockets are open before the first idle ones time out (the
    // loop opening them takes seconds on a loaded machine): the server must make room.
    let header_timeout = Duration::from_secs(8);
    let mut server = start_limited(
        dir.path(),
        &[
            ("DINGHOOK_HEADER_TIMEOUT", "8s"),
            ("DINGHOOK_DISPATCH", "off"),
        ],
    )
    .await;
    let pid = pid(&server);
    let baseline_fds = open_fds(pid);

    // 250 from each of 127.0.0.1 … 127.0.0.8: every second one idle, the others sending a
    // request head one byte a second.
    let mut sockets = Vec::new();
    let opening = Instant::now();
    for host in 1..=8u8 {
        for _ in 0..250 {
            match connect_from(host, server.port).await {
                Ok(s) => sockets.push(s),
                Err(e) => panic!("could not open attacker socket {}: {e}", sockets.len()),
            }
        }
    }
    assert_eq!(sockets.len(), 2_000);
    eprintln!("2 000 sockets opened in {:?}", opening.elapsed());
    let (slow, idle): (Vec<_>, Vec<_>) = sockets
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let mut idle: Vec<TcpStream> = idle.into_iter().map(|(_, s)| s).collect();
    let dribble = tokio::spawn(async move {
        let mut slow: Vec<TcpStream> = slow.into_iter().map(|(_, s)| s).collect();
        let head =
            b"POST /dingtalk/callback?msg_signature=a&timestamp=1&nonce=b HTTP/1.1\r\nHost: x\r\n";
        for byte in head.iter().cycle().take(8) {
            for s in &mut slow {
                let _ = s.write_all(&[*byte]).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        slow
    });

    // Valid callbacks, each on a new connection from 127.0.0.1, while the sockets are held.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let callback = server.url("/dingtalk/callback");
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let msg =
            format!(r#"{{"EventType":"chat_update_title","eventId":"held-{i}","ChatId":"c"}}"#);
        let started = Instant::now();
        assert!(
            deliver(&client, &callback, &msg).await,
            "callback {i} was not acknowledged"
        );
        slowest = slowest.max(started.elapsed());
        assert!(
            open_fds(pid) <= NOFILE as usize,
            "the server is at its descriptor limit"
        );
    }
    eprintln!(
        "slowest of 20 callbacks under 2 000 held sockets: {slowest:?}; server fds {} (baseline {baseline_fds})",
        open_fds(pid)
    );
    assert!(slowest < DINGTALK_WAIT, "slowest callback took {slowest:?}");
    let evicted = metric(
        &client,
        &server,
        r#"dinghook_connections_evicted_total{reason="total"}"#,
    )
    .await;
    assert!(evicted > 0.0, "no connection was closed to make room");

    // After the header timeout, the server has closed every idle socket it still had…
    let mut still_open = 0;
    for s in &mut idle {
        if !closed_within(s, header_timeout + Duration::from_secs(3)).await {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "idle sockets still open after the header timeout"
    );
    // …and every slow one, however steadily it sends.
    let mut slow = dribble.await.unwrap();
    let mut slow_open = 0;
    for s in &mut slow {
        if !closed_within(s, Duration::from_millis(50)).await {
            slow_open += 1;
        }
    }
    assert_eq!(
        slow_open, 0,
        "slow sockets still open after the header timeout"
    );
    let open = metric(&client, &server, "dinghook_connections_open").await;
    assert!(open <= 2.0, "{open} connections still open");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    server.terminate().await;
}

/// One client cannot take every slot: past `max_connections_per_client` its own oldest idle
/// connections are closed, and a client elsewhere is never touched.
#[tokio::test]
async fn one_client_cannot_take_the_slots_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_limited(
        dir.path(),
        &[
            ("DINGHOOK_MAX_CONNECTIONS_PER_CLIENT", "10"),
            ("DINGHOOK_DISPATCH", "off"),
        ],
    )
    .await;
    let mut other = connect_from(3, server.port).await.unwrap();
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(connect_from(2, server.port).await.unwrap());
    }
    // The first 30 of the flood were closed to make room for its last 10.
    let mut closed = 0;
    for s in &mut flood {
        if closed_within(s, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 30, "the flooding client keeps exactly its cap");
    assert!(
        !closed_within(&mut other, Duration::from_millis(200)).await,
        "another client's idle connection was closed"
    );
    server.terminate().await;
}

/// 400 connections each sending 1 MiB to the callback with a fresh timestamp but no valid
/// signature (the attack of the hostile-clients report: 63 → 451–568 MB, 341–491 MB after):
/// the bodies held at once stay within `callback.body_budget`, the excess is refused with 503
/// `busy` without being read, and the memory is given back afterwards. The budget is 4 MiB
/// here, not the default 32: how many bodies arrive at once depends on how fast this test's
/// one thread writes them, and with 32 MiB a slow moment let every body through in turn.
#[tokio::test]
async fn a_flood_of_unsigned_bodies_stays_within_the_body_budget() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let mut server = ServerProcess::start(
        &db,
        free_port(),
        &[
            ("DINGHOOK_DISPATCH", "off"),
            ("DINGHOOK_BODY_BUDGET", "4194304"),
        ],
    )
    .await;
    let pid = pid(&server);
    let client = reqwest::Client::new();
    for i in 0..20 {
        let msg =
            format!(r#"{{"EventType":"chat_update_title","eventId":"warm-{i}","ChatId":"c"}}"#);
        assert!(deliver(&client, &server.url("/dingtalk/callback"), &msg).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = status_kib(pid, "VmRSS");

    let body = bytes::Bytes::from(format!(
        r#"{{"encrypt":"{}"}}"#,
        "A".repeat(1024 * 1024 - 14)
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..400 {
        let body = body.clone();
        let port = server.port;
        tasks.push(tokio::spawn(async move {
            let now = dinghook::time::now_millis();
            let head = format!(
                "POST /dingtalk/callback?msg_signature=0&timestamp={now}&nonce=x HTTP/1.1\r\n\
                 Host: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            s.write_all(head.as_bytes()).await.ok()?;
            // The server may answer and close before taking the whole body.
            let _ = s.write_all(&body).await;
            let mut reply = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply)).await;
            let reply = String::from_utf8_lossy(&reply).into_owned();
            reply.get(9..12).map(str::to_owned)
        }));
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let status = t.await.unwrap().unwrap_or_else(|| "none".into());
        *statuses.entry(status).or_default() += 1;
    }
    let peak = status_kib(pid, "VmHWM");
    eprintln!(
        "400 x 1 MiB in {:?}: replies {statuses:?}; RSS baseline {} MB, peak {} MB",
        started.elapsed(),
        baseline / 1024,
        peak / 1024
    );
    // "none": refused and closed with the body unread, so the kernel reset the connection
    // and the 503 in flight was lost with it.
    assert!(
        statuses
            .keys()
            .all(|s| s == "401" || s == "503" || s == "none"),
        "only signature failures and busy refusals: {statuses:?}"
    );
    // Whether the flood itself met the budget depends on how fast its bodies arrive (a
    // request without a reply may also be a 401 whose close reset a body still being
    // written). That the budget refuses is shown without timing: four requests that
    // announce 1 MiB each and send a few bytes hold all 4 MiB; a fifth waits out the budget
    // and is refused with 503, counted as busy.
    let busy_before = busy_counted(&server).await;
    // Each 503 the flood got is a refusal the server counted.
    assert!(
        statuses.get("503").copied().unwrap_or(0) as u64 <= busy_before,
        "{statuses:?}, {busy_before} counted"
    );
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        let head = format!(
            "POST /dingtalk/callback?msg_signature=0&timestamp={}&nonce=x HTTP/1.1\r\n\
             Host: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"encrypt\":\"",
            dinghook::time::now_millis(),
            1024 * 1024
        );
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fifth = reqwest::Client::new()
        .post(server.url(&format!(
            "/dingtalk/callback?msg_signature=0&timestamp={}&nonce=x",
            dinghook::time::now_millis()
        )))
        .header("content-type", "application/json")
        .body(format!(r#"{{"encrypt":"{}"}}"#, "A".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fifth.status(),
        503,
        "the budget is held by the stalled four"
    );
    assert_eq!(busy_counted(&server).await, busy_before + 1);
    drop(stalled);
    // The budget is 4 MiB; allow 64 MiB more for buffers on the way in.
    assert!(
        peak < baseline + 68 * 1024,
        "peak RSS {peak} KiB against a baseline of {baseline} KiB"
    );
    let mut after = status_kib(pid, "VmRSS");
    for _ in 0..50 {
        if after < baseline + 16 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = status_kib(pid, "VmRSS");
    }
    eprintln!("RSS 10 s after the flood at most: {} MB", after / 1024);
    assert!(
        after < baseline + 16 * 1024,
        "RSS {after} KiB after the flood, baseline {baseline} KiB"
    );
    // The store still takes events.
    assert!(
        deliver(
            &client,
            &server.url("/dingtalk/callback"),
            r#"{"EventType":"chat_update_title","eventId":"after","ChatId":"c"}"#
        )
        .await
    );
    server.terminate().await;
}

/// SIGTERM with a half-sent request head and an idle connection open: the server does not wait
/// for them (the report measured 11.8 s, the HTTP drain eating the workers' deadline).
#[tokio::test]
async fn a_half_sent_request_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let mut server = ServerProcess::start(&db, free_port(), &[]).await;
    let mut half = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    half.write_all(b"POST /dingtalk/callback HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await
        .unwrap();
    let _idle = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let status = server.terminate().await;
    let took = started.elapsed();
    eprintln!("SIGTERM with a half-sent head and an idle connection: exited in {took:?}");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("abandoning"), "{log}");
}

/// With `max_connections` set above the open-file limit, the process does run out of
/// descriptors: the accept errors are logged (once a second, not once per attempt) and
/// counted, the loop does not spin, and the server serves again once the sockets go.
#[tokio::test]
async fn running_out_of_descriptors_is_logged_counted_and_survived() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_limited(
        dir.path(),
        &[
            ("DINGHOOK_MAX_CONNECTIONS", "5000"),
            ("DINGHOOK_MAX_CONNECTIONS_PER_CLIENT", "5000"),
            ("DINGHOOK_DISPATCH", "off"),
        ],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..1_100 {
        held.push(connect_from(4, server.port).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::new();
    let errors = metric(&client, &server, "dinghook_accept_errors_total").await;
    assert!(errors > 0.0, "no accept error counted");
    assert!(
        deliver(
            &client,
            &server.url("/dingtalk/callback"),
            r#"{"EventType":"chat_update_title","eventId":"after-emfile","ChatId":"c"}"#
        )
        .await,
        "not serving after the descriptors came back"
    );
    server.terminate().await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    let lines = log.matches("could not accept a connection").count();
    assert!(
        (1..=5).contains(&lines),
        "{lines} accept-error lines for {errors} errors:\n{log}"
    );
}

/// `dinghook_callbacks_rejected_total{reason="busy"}`, summed over apps.
async fn busy_counted(server: &ServerProcess) -> u64 {
    let metrics = reqwest::get(server.ops_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("dinghook_callbacks_rejected_total{") && l.contains("reason=\"busy\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
