//! Load generator: posts distinct, validly signed and encrypted events to a running dinghook
//! and reports acknowledged requests/s, latency percentiles and errors.
//!
//!   cargo run --release --example loadgen -- --url http://127.0.0.1:8080/dingtalk/callback \
//!       --concurrency 64 --seconds 10
//!
//! The keys default to `config/dev.toml`'s development keys. `--plain` sends the same requests
//! but only counts 200s, for measuring a server that is not dinghook (the constant-200 ceiling).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dinghook::crypto::{random_nonce, CallbackCipher, Sealed};
use dinghook::time::now_millis;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080/dingtalk/callback")]
    url: String,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Approximate size of each event's JSON, in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Total requests per second across all connections (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stop after this many requests in total (0: no limit).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    #[arg(long, default_value = "dinghook-dev-token")]
    token: String,
    #[arg(long, default_value = "DEVONLYdinghookLocalTestingKeyNotForProdXyz")]
    aes_key: String,
    #[arg(long, default_value = "dingdevappkey")]
    owner_key: String,
    /// Event type to send.
    #[arg(long, default_value = "attendance_check_record")]
    event_type: String,
    /// Number of distinct users to spread check-ins over (0: a new user per event).
    #[arg(long, default_value_t = 0)]
    users: u64,
    /// Count 200s without verifying the reply (for a baseline server that is not dinghook;
    /// the requests are the same).
    #[arg(long)]
    plain: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Random 32-hex-digit eventIds, as DingTalk's are, instead of ones that increase per
    /// connection (which the store's indexes append to at a few places only).
    #[arg(long)]
    random_ids: bool,
    /// Spread the requests over several apps: a file of lines `PATH TOKEN AES_KEY OWNER_KEY`,
    /// each request going to the next app's path (on `--url`'s host) sealed with its keys.
    #[arg(long)]
    apps_file: Option<std::path::PathBuf>,
}

/// One app the requests go to: its URL and keys.
struct Target {
    url: String,
    cipher: CallbackCipher,
}

/// The `--apps-file` targets, or `--url` with the `--token`/`--aes-key`/`--owner-key` keys.
fn targets(args: &Args) -> Vec<Target> {
    let Some(file) = &args.apps_file else {
        let cipher = CallbackCipher::from_strings(&args.token, &args.aes_key, &[], &args.owner_key)
            .expect("keys");
        return vec![Target {
            url: args.url.clone(),
            cipher,
        }];
    };
    // scheme://host:port, without the path.
    let origin: String = args
        .url
        .splitn(4, '/')
        .take(3)
        .collect::<Vec<_>>()
        .join("/");
    let text = std::fs::read_to_string(file).expect("apps file");
    let targets: Vec<Target> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 4, "PATH TOKEN AES_KEY OWNER_KEY: {line}");
            Target {
                url: format!("{origin}{}", f[0]),
                cipher: CallbackCipher::from_strings(f[1], f[2], &[], f[3]).expect("keys"),
            }
        })
        .collect();
    assert!(!targets.is_empty(), "no apps in {}", file.display());
    targets
}

struct Outcome {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

fn event(args: &Args, run: &str, task: usize, n: u64, filler: &str) -> String {
    // Events are numbered across connections in sending order (n-th round, task), so with
    // `--requests 2U --users U` every user sends exactly two, about half the run apart.
    let user = if args.users > 0 {
        (n * args.concurrency as u64 + task as u64) % args.users
    } else {
        task as u64 * 10_000_000 + n
    };
    let id = if args.random_ids {
        format!("{:032x}", rand::random::<u128>())
    } else {
        format!("{run}-{task}-{n}")
    };
    format!(
        r#"{{"EventType":"{}","eventId":"{id}","CorpId":"dingloadgen","dataList":[{{"userId":"user{user}","corpId":"dingloadgen","checkTime":{},"groupId":"g1","bizId":"{run}{task}{n}","locationMethod":"MAP","locationResult":"Normal","checkByUser":true,"note":"{filler}"}}]}}"#,
        args.event_type,
        now_millis()
    )
}

/// What every connection's task shares.
struct Shared {
    args: Args,
    targets: Vec<Target>,
    client: reqwest::Client,
    /// Makes event ids unique across runs against the same database.
    run: String,
    stop: AtomicBool,
    per_task_interval: Option<Duration>,
    /// With `--requests`: how many each task sends (the first ones send one more, so the
    /// total is exact).
    max_per_task: u64,
    remainder: u64,
}

async fn worker(shared: Arc<Shared>, task: usize) -> Outcome {
    let Shared {
        args,
        targets,
        client,
        run,
        stop,
        per_task_interval,
        max_per_task,
        remainder,
        ..
    } = &*shared;
    let per_task_interval = *per_task_interval;
    let max_requests = max_per_task + u64::from((task as u64) < *remainder);
    let filler = "x".repeat(args.size.saturating_sub(330));
    let mut out = Outcome {
        latencies_us: Vec::with_capacity(1 << 16),
        ok: 0,
        errors: 0,
        first_error: None,
    };
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && (args.requests == 0 || n < max_requests) {
        if let Some(interval) = per_task_interval {
            // Tasks are offset within the interval, so the load is steady rather than
            // `concurrency` requests at once every interval.
            let offset = interval.mul_f64(task as f64 / args.concurrency as f64);
            let due = start + offset + interval * n as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        // The same signed, encrypted request in both modes, so a baseline server is loaded
        // exactly as dinghook is; `--plain` only skips verifying the reply.
        let target = &targets[(n as usize * args.concurrency + task) % targets.len()];
        let cipher = &target.cipher;
        let (url, body) = {
            let msg = event(args, run, task, n, &filler);
            let sealed = cipher
                .seal(msg.as_bytes(), &now_millis().to_string(), &random_nonce())
                .expect("seal");
            (format!("{}?{}", target.url, sealed.query()), sealed.body())
        };
        n += 1;
        let sent = Instant::now();
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let outcome = match result {
            Ok(r) if r.status() == 200 => {
                let bytes = r.bytes().await;
                match (args.plain, bytes) {
                    (true, Ok(_)) => Ok(()),
                    (false, Ok(b)) => match serde_json::from_slice::<Sealed>(&b) {
                        Ok(s) => cipher
                            .open(&s.msg_signature, &s.timestamp, &s.nonce, &s.encrypt)
                            .map(|_| ())
                            .map_err(|e| format!("bad reply: {e}")),
                        Err(e) => Err(format!("bad reply: {e}")),
                    },
                    (_, Err(e)) => Err(e.to_string()),
                }
            }
            Ok(r) => Err(format!(
                "HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        };
        let elapsed = sent.elapsed();
        match outcome {
            Ok(()) => {
                out.ok += 1;
                out.latencies_us
                    .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
            }
        }
    }
    out
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let targets = targets(&args);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let per_task_interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
    let (max_per_task, remainder) = if args.requests > 0 {
        let c = args.concurrency as u64;
        (args.requests / c, args.requests % c)
    } else {
        (0, 0)
    };
    let shared = Arc::new(Shared {
        run: random_nonce()[..8].to_string(),
        targets,
        client,
        stop: AtomicBool::new(false),
        per_task_interval,
        max_per_task,
        remainder,
        args,
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..shared.args.concurrency)
        .map(|task| tokio::spawn(worker(Arc::clone(&shared), task)))
        .collect();
    if shared.args.seconds > 0.0 {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(shared.args.seconds)).await;
            shared.stop.store(true, Ordering::Relaxed);
        });
    }
    let mut latencies = Vec::new();
    let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
    for t in tasks {
        let o = t.await.expect("worker");
        latencies.extend(o.latencies_us);
        ok += o.ok;
        errors += o.errors;
        first_error = first_error.or(o.first_error);
    }
    let args = &shared.args;
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let rps = ok as f64 / elapsed;
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ok": ok, "errors": errors, "seconds": elapsed, "rps": rps,
                "p50_ms": p50, "p99_ms": p99, "max_ms": max,
                "concurrency": args.concurrency, "first_error": first_error,
            })
        );
    } else {
        println!(
            "{ok} ok, {errors} errors in {elapsed:.2} s: {rps:.0} req/s; latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (concurrency {})",
            args.concurrency
        );
        if let Some(e) = first_error {
            println!("first error: {e}");
        }
    }
}
