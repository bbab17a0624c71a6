//! The limiter on the request path (local mode: no Redis).
//!
//! `cargo bench -p aihub-benches --bench limits` measures:
//! - `gcra_decide`: one bucket decision (the arithmetic alone);
//! - `local_admit/*`: [`LocalBuckets::admit`], all buckets of a request decided and committed
//!   under their locks: a hot developer (requests + tokens), a key with limits of its own plus
//!   its developer (four buckets), and 10,000 developers round-robin (cache misses);
//! - `admit_settle/free_plan`: the whole [`Limits::admit`] + [`Limits::settle`] of a Free-plan
//!   key: limits resolved from the plan, concurrency slot, quota check and reservation, two
//!   buckets, then the settle with real usage.
//!
//! The target is "limiter check ≤ 100 ns" (the `local_admit` rows).

use std::hint::black_box;
use std::sync::Arc;

use aihub_gateway::keys::KeyLimits;
use aihub_gateway::keys::KeyRecord;
use aihub_gateway::limits::gcra::{decide, Rate};
use aihub_gateway::limits::local::{LocalBuckets, Rates};
use aihub_gateway::limits::{Limits, Settings};
use aihub_gateway::metrics::LimitMetrics;
use aihub_plans::PlanCatalog;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;

/// Limits so high that nothing is refused while measuring (refusals are cheaper).
const HUGE: u32 = 2_000_000_000;

fn limits(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits");
    g.bench_function("gcra_decide", |b| {
        let rate = Rate::per_minute(HUGE);
        let mut tat = 0;
        let mut now = 1_000_000_000;
        b.iter(|| {
            now += 1;
            let d = decide(black_box(tat), now, rate, 1, false);
            tat = d.new_tat;
            black_box(d.remaining)
        })
    });

    let buckets = LocalBuckets::default();
    let key: Arc<str> = "key_0000000000000000000000000000".into();
    let dev: Arc<str> = "dev_0000000000000000000000000000".into();
    let dev_only = Rates {
        dev_requests: Some(Rate::per_minute(HUGE)),
        dev_tokens: Some(Rate::per_minute(HUGE)),
        ..Rates::default()
    };
    let all_four = Rates {
        key_requests: Some(Rate::per_minute(HUGE)),
        key_tokens: Some(Rate::per_minute(HUGE)),
        ..dev_only
    };
    let start = std::time::Instant::now();
    let now = || start.elapsed().as_micros() as i64;
    g.bench_function("local_admit/hot_developer", |b| {
        b.iter(|| black_box(buckets.admit(&key, &dev, &dev_only, 100, now()).is_ok()))
    });
    g.bench_function("local_admit/key_and_developer", |b| {
        b.iter(|| black_box(buckets.admit(&key, &dev, &all_four, 100, now()).is_ok()))
    });
    let devs: Vec<Arc<str>> = (0..10_000).map(|i| format!("dev_{i:028}").into()).collect();
    let mut i = 0;
    g.bench_function("local_admit/10k_developers", |b| {
        b.iter(|| {
            i = (i + 1) % devs.len();
            black_box(buckets.admit(&key, &devs[i], &dev_only, 100, now()).is_ok())
        })
    });

    let registry = prometheus::Registry::new();
    let (limiter, _alerts) = Limits::new(
        Settings {
            default_max_tokens: 1024,
        },
        None,
        LimitMetrics::new(&registry, false),
    );
    let limiter = Arc::new(limiter);
    let mut plans = PlanCatalog::builtin();
    for p in plans.plans.values_mut() {
        p.requests_per_minute = Some(HUGE);
        p.tokens_per_minute = Some(HUGE);
        p.included_tokens = Some(u64::MAX / 4);
    }
    let plans = Arc::new(plans);
    let record = Arc::new(KeyRecord {
        key_id: key.clone(),
        developer_id: dev.clone(),
        active: true,
        limits: Arc::new(KeyLimits {
            plan: Some("free".into()),
            ..KeyLimits::default()
        }),
        ..KeyRecord::default()
    });
    g.bench_function("admit_settle/free_plan", |b| {
        b.iter(|| {
            let admission = limiter
                .admit(&record, &plans)
                .now_or_never()
                .expect("local admission never waits")
                .expect("admitted");
            let cost = aihub_gateway::limits::Cost {
                reserve: 120,
                declared: 120,
            };
            let admission = limiter
                .reserve(admission, cost)
                .now_or_never()
                .expect("local admission never waits")
                .expect("admitted");
            limiter.settle(admission, 20, 20_000, &plans);
        })
    });
    // The headers on a response shaped like the mock's (12 headers), as the gateway builds the
    // client's response from the upstream's (plain `http` parts), against the copy alone.
    let mut upstream = pingora_http::ResponseHeader::build(200, Some(16)).unwrap();
    for (n, v) in [
        ("content-type", "application/json"),
        (
            "x-mock-body-sha256",
            "d5606a5746f1641aeed192a48d0380bbe7d886100bfc87a6be80be37d2f3be69",
        ),
        ("openai-processing-ms", "1"),
        (
            "x-mock-request-sha256",
            "6149ca9d80a5ba2ede06bc594fedae824a30589c1f7bf323d5034615f33b17e8",
        ),
        ("x-mock-request-bytes", "60"),
        ("x-mock-server", "mock"),
        ("date", "Wed, 25 Nov 2026 13:24:50 GMT"),
        ("content-length", "590"),
        ("x-upstream-request-id", "req_mock1"),
        ("x-request-id", "01a212e1-6471-7234-abec-31179c8cdac6"),
    ] {
        upstream.insert_header(n, v).unwrap();
    }
    let shown = aihub_gateway::limits::headers::Shown {
        limit: 600,
        remaining: 599,
        reset_us: 100_000,
    };
    let headers = aihub_gateway::limits::headers::RateHeaders {
        requests: Some(shown),
        tokens: Some(aihub_gateway::limits::headers::Shown {
            limit: 150_000,
            remaining: 149_000,
            reset_us: 400_000,
        }),
    };
    g.bench_function("headers/parts_only", |b| {
        b.iter(|| black_box(upstream.as_owned_parts()))
    });
    g.bench_function("headers/parts_and_apply", |b| {
        b.iter(|| {
            let mut r = upstream.as_owned_parts();
            headers.apply(&mut r.headers);
            black_box(r)
        })
    });
    g.finish();
}

criterion_group!(benches, limits);
criterion_main!(benches);
