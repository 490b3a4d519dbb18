//! Per-call overhead of the DingTalk client against the fake on loopback, compared with a raw
//! reqwest call to the same endpoint. The difference is what the client adds: token cache, QPS
//! limiter, request building, answer classification, typed decoding and quota counting.
//!
//! Run: `cargo bench --bench client`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dinghook::dingtalk::{Client, ClientConfig, MemoryCounter, Secret};
use fake_dingtalk::FakeDingTalk;
use serde_json::{json, Value};

fn client_overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (fake, base) = rt.block_on(FakeDingTalk::spawn()).expect("fake starts");
    fake.add_user(
        json!({"userid": "alice", "unionid": "union-alice", "name": "Alice",
                         "mobile": "13800000000", "dept_id_list": [1]}),
    );
    let config = ClientConfig {
        app_key: "bench-key".into(),
        app_secret: Secret::new("bench-secret"),
        agent_id: Some(1),
        oapi_url: base.clone(),
        api_url: base.clone(),
        // High enough that the limiter never waits: we measure its bookkeeping, not its delay.
        qps: 1_000_000,
        monthly_quota: u64::MAX,
        ..ClientConfig::default()
    };
    let client = Client::new(config, Arc::new(MemoryCounter::new())).expect("client");
    let token = rt.block_on(client.access_token()).expect("token");
    let raw = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest");
    let url = format!("{base}/topapi/v2/user/get?access_token={token}");
    let body = json!({"userid": "alice"});

    let mut group = c.benchmark_group("user_get_loopback");
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("raw_reqwest", |b| {
        b.iter(|| {
            rt.block_on(async {
                let answer: Value = raw
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("send")
                    .json()
                    .await
                    .expect("json");
                assert_eq!(answer["errcode"], 0);
            })
        })
    });
    group.bench_function("dinghook_client", |b| {
        b.iter(|| {
            rt.block_on(async {
                let user = client.get_user("alice", None).await.expect("get_user");
                assert_eq!(user.userid, "alice");
            })
        })
    });
    group.finish();
    fake.clear_calls();
}

criterion_group!(benches, client_overhead);
criterion_main!(benches);
