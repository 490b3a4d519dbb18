//! verify+decrypt and encrypt+sign for 1 KB and 60 KB events.
//! Run: cargo bench --bench crypto

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dinghook::crypto::CallbackCipher;

/// An attendance event padded with records to about `size` bytes.
fn event_of(size: usize) -> String {
    let record = r#"{"userId":"0126xxxxxxxx","corpId":"dingxxxxxxxx","checkTime":1570791880000,"groupId":"4C63xxxx","bizId":"FF62xxxx","locationMethod":"MAP","locationResult":"Normal","checkByUser":true}"#;
    let mut items = Vec::new();
    let mut len = 80;
    while len < size {
        items.push(record);
        len += record.len() + 1;
    }
    format!(
        r#"{{"EventType":"attendance_check_record","eventId":"e1","dataList":[{}]}}"#,
        items.join(",")
    )
}

fn bench(c: &mut Criterion) {
    let cipher = CallbackCipher::from_strings(
        "bench-token",
        "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij",
        &[],
        "dingbenchapp",
    )
    .expect("keys");
    let mut group = c.benchmark_group("callback");
    for (name, size) in [("1KB", 1024), ("60KB", 60 * 1024)] {
        let msg = event_of(size);
        let sealed = cipher
            .seal(msg.as_bytes(), "1700000000000", "benchnonce")
            .expect("seal");
        group.throughput(Throughput::Bytes(msg.len() as u64));
        group.bench_with_input(BenchmarkId::new("verify_decrypt", name), &sealed, |b, s| {
            b.iter(|| {
                cipher
                    .open(
                        black_box(&s.msg_signature),
                        black_box(&s.timestamp),
                        black_box(&s.nonce),
                        black_box(&s.encrypt),
                    )
                    .expect("open")
            })
        });
        group.bench_with_input(BenchmarkId::new("encrypt_sign", name), &msg, |b, m| {
            b.iter(|| {
                cipher
                    .seal(black_box(m.as_bytes()), "1700000000000", "benchnonce")
                    .expect("seal")
            })
        });
    }
    group.bench_function("seal_success_reply", |b| {
        b.iter(|| cipher.seal_success(1_795_284_000_000).expect("seal"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
