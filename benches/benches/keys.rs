//! Key authentication and body inspection on the request path.
//!
//! `cargo bench -p aihub-benches --bench keys` loads 1,000,000 keys into the gateway's in-memory
//! store (the size named in the gateway-core issue), then measures parse + checksum + sha256 +
//! lookup + expiry check for keys spread over the whole map (cache misses included), and prints
//! the resident memory the store added.

use std::hint::black_box;

use aihub_apikey::KeyHash;
use aihub_gateway::clock::now_ms;
use aihub_gateway::keys::{authenticate, KeyRecord, MemoryKeyStore, Patterns};
use aihub_gateway::request;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const KEYS: usize = 1_000_000;
const SAMPLE: usize = 4096;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A store of `KEYS` keys shaped like real ones (own ids, shared permission lists), and a
/// sample of presented keys spread over it.
fn loaded_store() -> (MemoryKeyStore, Vec<String>) {
    let models = Patterns::parse(&["gpt-4o*", "demo"]).unwrap();
    let endpoints = Patterns::any();
    let keys: Vec<String> = (0..KEYS).map(|_| aihub_apikey::generate()).collect();
    let before = rss_kib();
    let store = MemoryKeyStore::with_capacity(KEYS);
    for (i, key) in keys.iter().enumerate() {
        store.insert(
            KeyHash::of(key),
            KeyRecord {
                key_id: format!("key_{i:012}").into(),
                developer_id: format!("dev_{:08}", i / 3).into(),
                models: models.clone(),
                endpoints: endpoints.clone(),
                expires_at_ms: aihub_gateway::keys::expiry_ms(now_ms() + 86_400_000),
                active: true,
                ..KeyRecord::default()
            },
        );
    }
    let after = rss_kib();
    eprintln!(
        "key store: {KEYS} keys added {} MiB RSS ({} bytes/key)",
        (after - before) / 1024,
        (after - before) * 1024 / KEYS as u64
    );
    let step = KEYS / SAMPLE;
    let sample = (0..SAMPLE).map(|i| keys[i * step].clone()).collect();
    (store, sample)
}

fn bench_auth(c: &mut Criterion) {
    let (store, sample) = loaded_store();
    let now = now_ms();
    let mut g = c.benchmark_group("authenticate_1M_keys");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("valid_key", |b| {
        b.iter(|| {
            i = (i + 1) % SAMPLE;
            black_box(authenticate(&store, Some(black_box(&sample[i])), now)).is_ok()
        })
    });
    let unknown: Vec<String> = (0..SAMPLE).map(|_| aihub_apikey::generate()).collect();
    g.bench_function("unknown_key", |b| {
        b.iter(|| {
            i = (i + 1) % SAMPLE;
            black_box(authenticate(&store, Some(black_box(&unknown[i])), now)).is_err()
        })
    });
    let mut typo = sample[0].clone().into_bytes();
    typo[12] ^= 1;
    let typo = String::from_utf8(typo).unwrap();
    g.bench_function("bad_checksum", |b| {
        b.iter(|| black_box(authenticate(&store, Some(black_box(&typo)), now)).is_err())
    });
    g.finish();
}

fn bench_inspect(c: &mut Criterion) {
    let mut g = c.benchmark_group("inspect_body");
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let prompt = "x".repeat(size);
        let body = format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{prompt}\"}}],\"stream\":true,\"model\":\"gpt-4o\"}}"
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("model_last_{size}B"), |b| {
            b.iter(|| black_box(request::inspect(black_box(body.as_bytes())).unwrap()))
        });
        g.bench_function(format!("inspect_and_rewrite_{size}B"), |b| {
            b.iter_batched(
                || bytes::Bytes::copy_from_slice(body.as_bytes()),
                |body| {
                    let p = request::inspect(&body).unwrap();
                    black_box(request::upstream_body(
                        body,
                        &p,
                        Some("gpt-4o-2024-08-06"),
                        false,
                    ))
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_auth, bench_inspect);
criterion_main!(benches);
