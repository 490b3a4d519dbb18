//! The operator commands against a real store file, with the server not running.

mod support;

use std::process::Command;
use std::sync::Arc;

use dinghook::store::{scoped, NewEvent, Source};
use dinghook::time::now_millis;
use support::stores::open_url;

fn dinghook(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dinghook"))
        .args(args)
        .env_clear()
        .env("DINGHOOK_STORE_URL", url)
        .output()
        .expect("run dinghook");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn list_show_stats_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let store = open_url(&url).await;
    let now = now_millis();
    for (key, event_type) in [
        ("a", "chat_update_title"),
        ("b", "chat_update_title"),
        ("c", "todo_task_create"),
    ] {
        store
            .insert(NewEvent {
                app: "default".into(),
                dedup_key: key.into(),
                event_type: event_type.into(),
                corp_id: None,
                payload: format!(r#"{{"EventType":"{event_type}","k":"{key}"}}"#),
                source: Source::Push,
                received_at: now,
                routes: Vec::new(),
            })
            .await
            .unwrap();
    }
    // Two die, one is done.
    let claimed = store.claim("w", 3, 60_000, now).await.unwrap();
    store
        .mark_dead(claimed[0].id, "w", "boom", &[], now)
        .await
        .unwrap();
    store
        .mark_dead(claimed[1].id, "w", "bang", &[], now)
        .await
        .unwrap();
    store.mark_done(claimed[2].id, "w", now).await.unwrap();
    store.close().await;

    let (ok, out, err) = dinghook(&url, &["events", "list", "--json", "--state", "dead"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for field in [
            "id",
            "dedup_key",
            "event_type",
            "state",
            "attempts",
            "last_error",
        ] {
            assert!(row.get(field).is_some(), "{field} missing in {row}");
        }
        assert_eq!(row["state"], "dead");
        assert_eq!(row["attempts"], 1);
    }

    let (ok, out, _) = dinghook(&url, &["events", "stats", "--json"]);
    assert!(ok);
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["by_state"]["dead"], 2);
    assert_eq!(stats["by_state"]["done"], 1);
    assert_eq!(stats["by_state"]["pending"], 0);
    assert_eq!(stats["by_type"]["chat_update_title"]["dead"], 2);

    let (ok, out, _) = dinghook(&url, &["events", "show", &claimed[0].id.to_string()]);
    assert!(ok);
    assert!(out.contains("\"boom\""), "{out}");

    let (ok, out, err) = dinghook(&url, &["events", "replay", "--state", "dead"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("2 event(s)"), "{out}");
    let (_, out, _) = dinghook(&url, &["events", "list", "--json", "--state", "pending"]);
    assert_eq!(out.lines().count(), 2);

    let id = claimed[2].id.to_string();
    let (ok, out, _) = dinghook(&url, &["events", "replay", &id]);
    assert!(ok && out.starts_with("1 event(s)"), "{out}");
    let (ok, out, _) = dinghook(&url, &["events", "replay", "--since", "1h"]);
    assert!(ok && out.starts_with("3 event(s)"), "{out}");

    // Mistakes are explained, not panics.
    let (ok, _, err) = dinghook(&url, &["events", "replay"]);
    assert!(!ok && err.contains("say what to replay"), "{err}");
    let (ok, _, err) = dinghook(&url, &["events", "list", "--state", "zombie"]);
    assert!(!ok && err.contains("unknown state"), "{err}");
    let (ok, _, err) = dinghook(&url, &["events", "show", "999"]);
    assert!(!ok && err.contains("no event with id 999"), "{err}");
}

/// `events stats` with several apps: the totals and one line per app; `--app NAME` that
/// app's counts, types and oldest waiting event only; an app without events, zeros.
#[tokio::test]
async fn stats_of_every_app_and_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let store = open_url(&url).await;
    let now = now_millis();
    let event = |key: &str, event_type: &str, received_at: i64| NewEvent {
        app: "default".into(),
        dedup_key: key.into(),
        event_type: event_type.into(),
        corp_id: None,
        payload: "{}".into(),
        source: Source::Push,
        received_at,
        routes: Vec::new(),
    };
    // Through each app's view of the store, as the server writes them.
    let default = scoped::for_app(Arc::clone(&store), "default");
    let ops = scoped::for_app(Arc::clone(&store), "ops");
    default
        .insert(event("d1", "chat_update_title", now - 90_000))
        .await
        .unwrap();
    default
        .insert(event("d2", "todo_task_create", now - 30_000))
        .await
        .unwrap();
    ops.insert(event("o1", "chat_update_title", now - 60_000))
        .await
        .unwrap();
    ops.insert(event("o2", "check_in", now - 50_000))
        .await
        .unwrap();
    ops.schedule(event("o3", "check_in", now), now + 3_600_000)
        .await
        .unwrap();
    // The oldest of each app: default's d1 done, ops's o1 dead.
    let claimed = store.claim("w", 1, 60_000, now).await.unwrap();
    assert_eq!(claimed[0].dedup_key, "d1");
    store.mark_done(claimed[0].id, "w", now).await.unwrap();
    let claimed = store.claim("w", 1, 60_000, now).await.unwrap();
    assert_eq!(claimed[0].dedup_key, "@ops/o1");
    store
        .mark_dead(claimed[0].id, "w", "no", &[], now)
        .await
        .unwrap();
    store.close().await;

    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = dinghook(&url, args);
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let all = json(&["events", "stats", "--json"]);
    assert_eq!(all["by_state"]["pending"], 3);
    assert_eq!(all["by_state"]["done"], 1);
    assert_eq!(all["by_state"]["dead"], 1);
    assert_eq!(all["by_type"]["chat_update_title"]["dead"], 1);
    assert_eq!(all["by_type"]["chat_update_title"]["done"], 1);
    assert_eq!(all["by_app"]["default"]["by_state"]["pending"], 1);
    assert_eq!(all["by_app"]["default"]["by_state"]["done"], 1);
    assert_eq!(all["by_app"]["ops"]["by_state"]["pending"], 2);
    assert_eq!(all["by_app"]["ops"]["by_state"]["dead"], 1);
    assert_eq!(all["by_app"]["ops"]["by_state"]["running"], 0);
    let age = |v: &serde_json::Value| v.as_i64().expect("an age");
    let default_age = age(&all["by_app"]["default"]["oldest_pending_age_ms"]);
    let ops_age = age(&all["by_app"]["ops"]["oldest_pending_age_ms"]);
    assert!((30_000..40_000).contains(&default_age), "{default_age}");
    assert!((50_000..60_000).contains(&ops_age), "{ops_age}");
    assert_eq!(age(&all["oldest_pending_age_ms"]), ops_age);

    let one = json(&["events", "stats", "--app", "ops", "--json"]);
    assert_eq!(one["by_state"]["pending"], 2);
    assert_eq!(one["by_state"]["dead"], 1);
    assert_eq!(one["by_state"]["done"], 0);
    assert_eq!(
        one["by_type"],
        serde_json::json!({"chat_update_title": {"dead": 1}, "check_in": {"pending": 2}})
    );
    let one_age = age(&one["oldest_pending_age_ms"]);
    assert!(
        (ops_age..ops_age + 5_000).contains(&one_age),
        "{one_age}, then {ops_age}"
    );
    let apps: Vec<&String> = one["by_app"].as_object().unwrap().keys().collect();
    assert_eq!(apps, ["ops"]);

    let nobody = json(&["events", "stats", "--app", "nobody", "--json"]);
    assert_eq!(nobody["by_state"]["pending"], 0);
    assert_eq!(nobody["by_type"], serde_json::json!({}));
    assert_eq!(nobody["oldest_pending_age_ms"], serde_json::Value::Null);
    assert_eq!(nobody["by_app"]["nobody"]["by_state"]["dead"], 0);

    // Text: the totals, the types, then one line per app.
    let (ok, out, err) = dinghook(&url, &["events", "stats"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "dead     1",
            "done     1",
            "pending  3",
            "retry    0",
            "running  0"
        ]
    );
    assert!(lines[5].starts_with("oldest waiting event: due 5"), "{out}");
    let apps: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("app "))
        .map(|l| l.split(';').next().unwrap())
        .collect();
    assert_eq!(
        apps,
        [
            "default          dead=0 done=1 pending=1 retry=0 running=0",
            "ops              dead=1 done=0 pending=2 retry=0 running=0",
        ],
        "{out}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains("; oldest waiting event: due 5"),
        "{out}"
    );

    let (ok, out, err) = dinghook(&url, &["events", "stats", "--app", "default"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "dead     0",
            "done     1",
            "pending  1",
            "retry    0",
            "running  0"
        ]
    );
    assert!(lines[5].starts_with("oldest waiting event: due 3"), "{out}");
    assert!(
        out.contains("todo_task_create") && !out.contains("check_in"),
        "{out}"
    );
    assert!(!out.contains("app "), "no per-app lines for one app: {out}");
}

/// The binary with a clean environment and the callback keys every command needs.
fn with_keys() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dinghook"));
    command
        .env_clear()
        .env("DINGHOOK_TOKEN", "t")
        .env("DINGHOOK_AES_KEY", support::AES_KEY)
        .env("DINGHOOK_OWNER_KEY", "dingowner");
    command
}

/// Values that used to crash the process, wedge the router or spend the quota are refused by
/// `check-config` and `serve` alike, naming the key and its variable, with no panic.
#[test]
fn out_of_range_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("x.db").display());
    let cases: &[(&str, &str, &str)] = &[
        (
            "DINGHOOK_STORE_MAX_BATCH",
            "1000000000000",
            "store.max_batch",
        ),
        (
            "DINGHOOK_STORE_MAX_BATCH",
            "2305843009213693952",
            "store.max_batch",
        ),
        (
            "DINGHOOK_STORE_MAX_BATCH",
            "18446744073709551615",
            "store.max_batch",
        ),
        ("DINGHOOK_STORE_MAX_BATCH", "0", "store.max_batch"),
        ("DINGHOOK_WORKERS", "100000000", "dispatch.workers"),
        ("DINGHOOK_CALLBACK_PATH", "/a/*rest", "callback.path"),
        ("DINGHOOK_CALLBACK_PATH", "/{id}", "callback.path"),
        ("DINGHOOK_CALLBACK_PATH", "/a/:id", "callback.path"),
        ("DINGHOOK_CALLBACK_PATH", "dingtalk", "callback.path"),
        ("DINGHOOK_REQUEST_TIMEOUT", "0", "request_timeout"),
        ("DINGHOOK_REQUEST_TIMEOUT", "300000y", "request_timeout"),
        ("DINGHOOK_BODY_LIMIT", "10", "callback.body_limit"),
        ("DINGHOOK_RECOVERY_INTERVAL", "1ms", "recovery.interval"),
        ("DINGHOOK_POLL_INTERVAL", "0", "dispatch.poll_interval"),
        (
            "DINGHOOK_RETRY_SCHEDULE",
            "1s,400d",
            "dispatch.retry_schedule",
        ),
    ];
    for (var, value, key) in cases {
        for command in ["check-config", "serve"] {
            let out = with_keys()
                .arg(command)
                .env("DINGHOOK_LISTEN", "127.0.0.1:0")
                .env("DINGHOOK_STORE_URL", &store)
                .env(var, value)
                .output()
                .expect("run dinghook");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{command} {var}={value}: {stderr}"
            );
            assert!(
                stderr.contains(key) && stderr.contains(var),
                "{command} {var}={value} must name {key} and {var}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    // The edges that are allowed still load.
    let out = with_keys()
        .arg("check-config")
        .env("DINGHOOK_STORE_MAX_BATCH", "10000")
        .env("DINGHOOK_CALLBACK_PATH", "/dingtalk/callback-v2.ops_1~x")
        .env("DINGHOOK_RECOVERY_INTERVAL", "1s")
        .output()
        .expect("run dinghook");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("interval = \"1s\""));
}

/// `encrypt` prints a curl command for `sh`: a URL with a quote in it stays one argument.
#[test]
fn the_printed_curl_command_quotes_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("injected");
    let url = format!("http://127.0.0.1:9/x' ; touch {} ; '", marker.display());
    let mut child = with_keys()
        .args(["encrypt", "--url", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run dinghook");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"EventType":"x"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let command = String::from_utf8(out.stdout).unwrap();
    // Run it with curl replaced by a function that prints its arguments one per line.
    let script = format!("curl() {{ printf '%s\\n' \"$@\"; }}\n{command}");
    let run = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(run.status.success());
    assert!(!marker.exists(), "the URL ran as a command: {command}");
    let args = String::from_utf8(run.stdout).unwrap();
    assert!(
        args.lines().any(|a| a.starts_with(&format!("{url}?"))),
        "the URL arrives whole: {args}"
    );
}

/// `events list` escapes control characters of stored values; `--since` errors name the flag;
/// a reader that goes away does not make the command panic.
#[tokio::test]
async fn the_event_list_is_safe_to_print_and_to_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let store = open_url(&url).await;
    let now = now_millis();
    for i in 0..2000 {
        let event_type = if i == 0 {
            "evil\n       1  done       0  forged\u{1b}[2J".to_owned()
        } else {
            format!("type{i}")
        };
        store
            .insert(NewEvent {
                app: "default".into(),
                dedup_key: format!("k{i}"),
                event_type,
                corp_id: None,
                payload: "{}".into(),
                source: Source::Push,
                received_at: now,
                routes: Vec::new(),
            })
            .await
            .unwrap();
    }
    store.close().await;
    let (ok, out, err) = dinghook(&url, &["events", "list", "--limit", "5000"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2000, "one line per event, none forged");
    assert!(
        out.contains(r"evil\u{a}") && !out.contains('\u{1b}'),
        "{out:.300}"
    );
    let (ok, out, err) = dinghook(&url, &["events", "stats"]);
    assert!(ok, "{err}");
    // Five states, the oldest waiting, 2 000 types, one app: none forged.
    assert_eq!(out.lines().count(), 5 + 1 + 2000 + 1);
    assert!(
        out.contains(r"evil\u{a}") && !out.contains('\u{1b}'),
        "{out:.300}"
    );

    let (ok, _, err) = dinghook(&url, &["events", "replay", "--since", "300000000y"]);
    assert!(!ok && err.contains("--since"), "{err}");
    let (ok, _, err) = dinghook(
        &url,
        &["events", "replay", "--since", "1960-01-01T00:00:00Z"],
    );
    assert!(!ok && err.contains("--since"), "{err}");

    // `dinghook events list | head -1`: the reader leaves after one line.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "DINGHOOK_STORE_URL='{url}' '{}' events list --limit 5000 | head -1",
            env!("CARGO_BIN_EXE_dinghook")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `encrypt` and `decrypt` pick an app's keys with `--app` (`default` without it), refuse an
/// unknown app naming the ones there are, and `check-config` lists the apps with their secrets
/// redacted.
#[test]
fn encrypt_decrypt_and_check_config_know_the_apps() {
    let ops_key = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut";
    let run = |args: &[&str]| {
        let out = with_keys()
            .env("DINGHOOK_APPS__OPS__TOKEN", "ops-token")
            .env("DINGHOOK_APPS__OPS__AES_KEY", ops_key)
            .env("DINGHOOK_APPS__OPS__OWNER_KEY", "dingops")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    std::fs::write(&event, r#"{"EventType":"chat_update_title","eventId":"x"}"#).unwrap();
    let event = event.to_str().unwrap();

    let (ok, out, err) = run(&["encrypt", "--app", "ops", "--json", event]);
    assert!(ok, "{err}");
    let sealed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        sealed["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:8080/dingtalk/callback/ops?"),
        "{out}"
    );
    let body = dir.path().join("body.json");
    std::fs::write(&body, sealed["body"].to_string()).unwrap();
    let url = sealed["url"].as_str().unwrap();
    let body = body.to_str().unwrap();
    let (ok, out, err) = run(&["decrypt", "--app", "ops", "--query", url, body]);
    assert!(ok && out.contains("chat_update_title"), "{out}{err}");
    // The default app's keys do not open it.
    let (ok, _, err) = run(&["decrypt", "--query", url, body]);
    assert!(!ok && err.contains("signature"), "{err}");
    let (ok, _, err) = run(&["encrypt", "--app", "nope", event]);
    assert!(
        !ok && err.contains("no app named \"nope\"") && err.contains("default, ops"),
        "{err}"
    );

    let (ok, out, err) = run(&["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("[apps.ops.callback]"), "{out}");
    assert!(out.contains("path = \"/dingtalk/callback/ops\""), "{out}");
    assert!(
        !out.contains("ops-token") && !out.contains(ops_key),
        "{out}"
    );
}
