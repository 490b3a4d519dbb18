//! Load generator for the HTTP API: submits N distinct actions (keys `PREFIX-0…`) as fast as
//! CONCURRENCY connections allow, or times GET requests of one path; reports the answers by
//! status, latency percentiles, and its own CPU time per request.
//!
//!   cargo run --release --example api_load -- --url http://127.0.0.1:8081 --token T \
//!       --actions 10000 --app default --concurrency 32
//!   cargo run --release --example api_load -- --url http://127.0.0.1:8081 --token T \
//!       --get '/api/v1/events?state=dead&limit=50' --requests 200

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    url: String,
    #[arg(long, env = "DINGHOOK_API_TOKEN")]
    token: String,
    /// Submit this many work-notification actions (0: do the GETs instead).
    #[arg(long, default_value_t = 0)]
    actions: u64,
    #[arg(long, default_value = "default")]
    app: String,
    /// Idempotency keys are `PREFIX-<i>`; the same prefix submits the same actions again.
    #[arg(long, default_value = "load")]
    key_prefix: String,
    /// The recipient of the notifications.
    #[arg(long, default_value = "alice")]
    user: String,
    /// A path to GET (with its query) `--requests` times.
    #[arg(long)]
    get: Option<String>,
    #[arg(long, default_value_t = 100)]
    requests: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency as usize)
        .build()
        .expect("client");
    let total = if args.actions > 0 {
        args.actions
    } else {
        args.requests
    };
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, args, next) = (client.clone(), args.clone(), Arc::clone(&next));
        let (latencies, statuses) = (Arc::clone(&latencies), Arc::clone(&statuses));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let request = if args.actions > 0 {
                    client
                        .post(format!("{}/api/v1/apps/{}/actions", args.url, args.app))
                        .bearer_auth(&args.token)
                        .header("Idempotency-Key", format!("{}-{i}", args.key_prefix))
                        .json(&json!({
                            "type": "work_notification",
                            "userid_list": [args.user],
                            "msg": {"msgtype": "text", "text": {"content": format!("{} #{i}", args.key_prefix)}}
                        }))
                } else {
                    let path = args.get.as_deref().unwrap_or("/api/v1/events");
                    client
                        .get(format!("{}{path}", args.url))
                        .bearer_auth(&args.token)
                };
                let sent = Instant::now();
                let status = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                latencies.lock().expect("latencies").push(sent.elapsed());
                *statuses.lock().expect("statuses").entry(status).or_default() += 1;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let mut latencies = latencies.lock().expect("latencies").clone();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let statuses = statuses.lock().expect("statuses").clone();
    println!(
        "{}",
        json!({
            "requests": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "per_second": latencies.len() as f64 / elapsed.as_secs_f64(),
            "statuses": statuses,
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "max_ms": at(1.0),
            "loadgen_cpu_us_per_request": cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
        })
    );
}
