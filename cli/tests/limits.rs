//! Black-box tests of rate limits, token limits and plan quotas: the real gateway process, the
//! mock upstream, real Redis (shared limits, outages), real ClickHouse (429s in usage) and the
//! real control-plane database (usage alerts).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;

fn redis_url() -> String {
    std::env::var("AIHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A `limits:` section; `redis` adds shared limits under a prefix of this test's own.
fn limits_yaml(plans_file: Option<&str>, redis: Option<&str>, extra: &[&str]) -> String {
    let mut y = String::from("limits:\n  default_max_tokens: 1024\n");
    if let Some(p) = plans_file {
        y.push_str(&format!("  plans_file: \"{p}\"\n"));
    }
    for e in extra {
        y.push_str(&format!("  {e}\n"));
    }
    if let Some(url) = redis {
        let prefix = format!("aihub-test-{}", uuid_like());
        y.push_str(&format!(
            "  redis:\n    url: \"{url}\"\n    prefix: \"{prefix}\"\n    timeout: 1s\n"
        ));
    }
    y
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A plans file with one plan `test` (plus the required default), written into `dir`.
fn plans_file(dir: &std::path::Path, plan: &str) -> String {
    let path = dir.join(format!("plans-{}.yaml", uuid_like()));
    write(
        &path,
        &format!("default_plan: test\nalert_thresholds: [80, 100]\nplans:\n  test:\n{plan}"),
    );
    path.display().to_string()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}

fn num(r: &reqwest::Response, name: &str) -> u64 {
    header(r, name).parse().unwrap()
}

fn gateway_with(mock: &Mock, keys: &[&TestKey], extra: &str) -> Gateway {
    let body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        keys,
    ) + extra;
    Gateway::start(&body, &["threads: 2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_against_a_key_limit_is_admitted_exactly() {
    let mock = Mock::start(&[]);
    let k = key("burst", &["rate_limit_rpm: 20"]);
    let gw = gateway_with(&mock, &[&k], &limits_yaml(None, None, &[]));
    let started = Instant::now();
    let body = chat("demo");
    let answers = join_all((0..50).map(|_| gw.chat(&k.key, &body))).await;
    let elapsed = started.elapsed();
    // One request per 3 s regenerates: within 3 s exactly the burst passes.
    assert!(
        elapsed < Duration::from_millis(2500),
        "burst took {elapsed:?}"
    );
    let mut remaining: Vec<u64> = Vec::new();
    let mut refused = 0;
    for r in answers {
        match r.status().as_u16() {
            200 => remaining.push(num(&r, "x-ratelimit-remaining-requests")),
            429 => {
                refused += 1;
                let wait = num(&r, "retry-after");
                assert!((1..=3).contains(&wait), "Retry-After {wait}");
                assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
                assert_eq!(num(&r, "x-ratelimit-limit-requests"), 20);
                let e = expect_error(r, 429, "rate_limit_exceeded").await;
                assert_eq!(e["type"], "requests");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..20).collect::<Vec<u64>>(),
        "no early cut-in, no overshoot"
    );
    assert_eq!(refused, 30);
    assert_eq!(
        gw.metric_eventually("aihub_rate_limited_total{reason=\"requests\"}", 30.0),
        30.0
    );
    // After one emission interval exactly one more passes.
    // The first admission happened within `elapsed` of `started`: one request has regenerated
    // 3 s after it, the next one only 6 s after it.
    let one_back = started + elapsed + Duration::from_millis(3100);
    tokio::time::sleep_until(one_back.into()).await;
    assert_eq!(gw.chat(&k.key, &chat("demo")).await.status(), 200);
    assert_eq!(gw.chat(&k.key, &chat("demo")).await.status(), 429);
}

/// The exact body sent (its length decides the prompt part of the reservation).
const BODY: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"Say hello"}],"max_tokens":10}"#;
/// What the mock reports for `BODY`: ⌈("user" + "Say hello") / 4⌉ = 4 prompt tokens, 10 completion.
const BODY_USAGE: u64 = 14;

async fn send(gw: &Gateway, key: &str, body: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = gw
        .post(key, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_exact_and_tokens_settle_with_real_usage() {
    headers_exact(None).await;
}

/// The same through Redis: small bodies are admitted in one script after the body is read,
/// settles reach Redis in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_exact_and_tokens_settle_with_real_usage_through_redis() {
    headers_exact(Some(redis_url())).await;
}

async fn headers_exact(redis: Option<String>) {
    let mock = Mock::start(&[]);
    let k = key("hdr", &["rate_limit_rpm: 60", "rate_limit_tpm: 1000"]);
    let gw = gateway_with(&mock, &[&k], &limits_yaml(None, redis.as_deref(), &[]));
    if redis.is_some() {
        wait_metric(&gw, "aihub_limits_redis_up", 1.0).await;
    }
    let reservation = (BODY.len() as u64).div_ceil(4) + 10;

    let first_sent = Instant::now();
    let r = send(&gw, &k.key, BODY, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "59");
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "1s");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1000");
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 1000 - reservation);
    // 60 ms per token.
    let reset_ms = reservation * 60;
    let expected_reset = if reset_ms.is_multiple_of(1000) {
        format!("{}s", reset_ms / 1000)
    } else {
        format!(
            "{}s",
            format!("{}.{:03}", reset_ms / 1000, reset_ms % 1000).trim_end_matches('0')
        )
    };
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), expected_reset);
    assert_eq!(
        header(&r, "ratelimit-policy"),
        "\"requests\";q=60;w=60, \"tokens\";q=1000;w=60"
    );
    assert_eq!(
        header(&r, "ratelimit"),
        format!(
            "\"requests\";r=59;t=1, \"tokens\";r={};t={}",
            1000 - reservation,
            reset_ms.div_ceil(1000)
        )
    );
    r.bytes().await.unwrap();

    // The first request settled at its real usage: the second sees 1000 − 14 − its own
    // reservation, plus what regenerated meanwhile (1000/min).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(&gw, &k.key, BODY, &[]).await;
    let regenerated = (first_sent.elapsed().as_millis() as u64).div_ceil(60) + 1;
    let left = num(&r, "x-ratelimit-remaining-tokens");
    let floor = 1000 - BODY_USAGE - reservation;
    assert!(
        (floor..=floor + regenerated).contains(&left),
        "remaining tokens {left}, expected {floor}..={}",
        floor + regenerated
    );
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 58);
    r.bytes().await.unwrap();

    // A reservation bigger than the whole budget is admitted while tokens are left, and puts
    // the bucket in debt: a request meanwhile is refused for tokens …
    let big = BODY.replace("\"max_tokens\":10", "\"max_tokens\":5000");
    let slow = tokio::spawn({
        let (url, key, big) = (gw.url("/v1/chat/completions"), k.key.clone(), big.clone());
        async move {
            client()
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .header("x-mock-latency-ms", "1500")
                .body(big)
                .send()
                .await
                .unwrap()
        }
    });
    // Admitted once it is in flight (held 1.5 s upstream).
    wait_metric(&gw, "aihub_in_flight_requests", 1.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = send(&gw, &k.key, BODY, &[]).await;
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 0);
    let e = expect_error(r, 429, "rate_limit_exceeded").await;
    assert_eq!(e["type"], "tokens");
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 0);
    r.bytes().await.unwrap();
    // … and once it settles at its real 14 tokens the budget is back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(&gw, &k.key, BODY, &[]).await;
    assert_eq!(r.status(), 200, "settled with real usage");
    assert!(num(&r, "x-ratelimit-remaining-tokens") > 900);
    assert_eq!(
        gw.metric_eventually("aihub_rate_limited_total{reason=\"tokens\"}", 1.0),
        1.0
    );
}

/// Through Redis a small announced body is read before its admission, which is then one
/// script; a request refused for its body or its route still takes its request and shows the
/// headers, as in two steps. A large body keeps the two steps (refused at a limit before it is
/// read). Both kinds draw on the same buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_redis_small_bodies_take_one_step_and_large_ones_two() {
    let mock = Mock::start(&[]);
    let k = key("steps", &["rate_limit_rpm: 5", "rate_limit_tpm: 100000"]);
    let gw = gateway_with(&mock, &[&k], &limits_yaml(None, Some(&redis_url()), &[]));
    wait_metric(&gw, "aihub_limits_redis_up", 1.0).await;
    let r = send(&gw, &k.key, "{not json", &[]).await;
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 4);
    expect_error(r, 400, "invalid_json").await;
    let r = send(&gw, &k.key, &BODY.replace("demo", "nope"), &[]).await;
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 3);
    expect_error(r, 404, "model_not_found").await;
    // Over 64 KiB: admitted in two steps, its whole reservation taken.
    let big = BODY.replace("Say hello", &"x".repeat(70_000));
    let r = send(&gw, &k.key, &big, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 2);
    let reservation = (big.len() as u64).div_ceil(4) + 10;
    assert_eq!(
        num(&r, "x-ratelimit-remaining-tokens"),
        100_000 - reservation
    );
    r.bytes().await.unwrap();
    for left in [1, 0] {
        let r = send(&gw, &k.key, BODY, &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), left);
        r.bytes().await.unwrap();
    }
    for body in [BODY, &big] {
        let r = send(&gw, &k.key, body, &[]).await;
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
        expect_error(r, 429, "rate_limit_exceeded").await;
    }
}

/// Through Redis, a large body's second step (the reservation script) refuses a request whose
/// declared tokens do not fit a hard-stop quota, and gives back the request the first step
/// took: the next request sees the same remaining requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_redis_a_refused_reservation_gives_its_request_back() {
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(
        dir.path(),
        "    included_tokens: 5000\n    overage: false\n",
    );
    let k = key("giveback", &["plan: test", "rate_limit_rpm: 10"]);
    let gw = gateway_with(
        &mock,
        &[&k],
        &limits_yaml(Some(&plans), Some(&redis_url()), &[]),
    );
    wait_metric(&gw, "aihub_limits_redis_up", 1.0).await;
    // Over 64 KiB (two steps) and ~17,500 declared tokens: more than the quota holds.
    let big = BODY.replace("Say hello", &"x".repeat(70_000));
    for _ in 0..2 {
        let r = send(&gw, &k.key, &big, &[]).await;
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 10);
        expect_error(r, 429, "insufficient_quota").await;
    }
    // A small body fits (one step) and takes its request.
    let r = send(&gw, &k.key, BODY, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_cap_per_key() {
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(
        dir.path(),
        "    overage: true\n    max_concurrent_requests: 3\n",
    );
    let k = key("conc", &["plan: test"]);
    let gw = gateway_with(&mock, &[&k], &limits_yaml(Some(&plans), None, &[]));
    let answers =
        join_all((0..10).map(|_| send(&gw, &k.key, BODY, &[("x-mock-latency-ms", "2000")]))).await;
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 3);
    for r in answers.into_iter().filter(|r| r.status() == 429) {
        assert_eq!(num(&r, "retry-after"), 1);
        expect_error(r, 429, "rate_limit_exceeded").await;
    }
    // The slots come back.
    assert_eq!(send(&gw, &k.key, BODY, &[]).await.status(), 200);
    assert_eq!(
        gw.metric_eventually("aihub_rate_limited_total{reason=\"concurrency\"}", 7.0),
        7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_hard_stop_and_429s_in_usage() {
    let db = TestDb::new();
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(
        dir.path(),
        "    included_tokens: 1000\n    overage: false\n    requests_per_minute: 1000\n",
    );
    let k = key("quota", &["plan: test"]);
    let wal = dir.path().join("wal");
    let extra = limits_yaml(Some(&plans), None, &[]) + &db.metering_yaml(&wal, &[]);
    let gw = gateway_with(&mock, &[&k], &extra);

    // Sequentially up to the edge: 14 tokens each, refused once 1000 are used.
    let mut ok = 0u64;
    loop {
        let r = send(&gw, &k.key, BODY, &[]).await;
        if r.status() == 429 {
            let wait = num(&r, "retry-after");
            assert!(
                wait > 0 && wait <= 31 * 86_400,
                "Retry-After {wait} (period end)"
            );
            // The rate-limit headers show the buckets as they stand (nothing taken).
            assert_eq!(num(&r, "x-ratelimit-limit-requests"), 1000);
            // (One request regenerates every 60 ms meanwhile.)
            let left = num(&r, "x-ratelimit-remaining-requests");
            assert!((1000 - ok..=1000).contains(&left), "{left} left after {ok}");
            let e = expect_error(r, 429, "insufficient_quota").await;
            assert_eq!(e["type"], "insufficient_quota");
            break;
        }
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        ok += 1;
        assert!(ok < 200, "never refused");
    }
    // Admission refuses once committed + reserved tokens reach the quota: the last admitted
    // request started below it, by less than its own reservation (each request is settled
    // before its last byte, so the next one never meets its reservation).
    let reservation = (BODY.len() as u64).div_ceil(4) + 10;
    let used = ok * BODY_USAGE;
    assert!(
        used >= 1000 - reservation && used < 1000 + BODY_USAGE,
        "used {used}"
    );

    // The refusals are in usage: status 429, zero tokens, the reason as error type.
    let n = db
        .wait_for(
            "SELECT count() FROM usage_events WHERE status = 429 AND total_tokens = 0 \
             AND error_type = 'insufficient_quota' AND key_id = 'quota'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 1);
    let tokens = db
        .wait_for(
            "SELECT sum(total_tokens) FROM usage_events WHERE key_id = 'quota'",
            i128::from(used as u32),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(tokens, i128::from(used as u32));
    drop(gw);

    // A restarted gateway knows this month's usage from ClickHouse: still refused.
    let gw = gateway_with(&mock, &[&k], &extra);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("aihub_limits_quota_seeded") != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send(&gw, &k.key, BODY, &[]).await;
    expect_error(r, 429, "insufficient_quota").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_starting_on_an_empty_redis_counts_the_months_usage_from_clickhouse() {
    let db = TestDb::new();
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(
        dir.path(),
        "    included_tokens: 200\n    overage: false\n    requests_per_minute: 1000\n",
    );
    let k = key("reseed", &["plan: test"]);
    let extra = limits_yaml(Some(&plans), Some(&redis_url()), &[])
        + &db.metering_yaml(&dir.path().join("wal"), &[]);
    let prefix = extra
        .lines()
        .find_map(|l| l.trim().strip_prefix("prefix: "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let gw = gateway_with(&mock, &[&k], &extra);
    wait_metric(&gw, "aihub_limits_redis_up", 1.0).await;
    let mut ok = 0u64;
    while send(&gw, &k.key, BODY, &[]).await.status() == 200 {
        ok += 1;
        assert!(ok < 100);
    }
    let used = ok * BODY_USAGE;
    db.wait_for(
        "SELECT sum(total_tokens) FROM usage_events WHERE key_id = 'reseed'",
        i128::from(used as u32),
        Duration::from_secs(10),
    )
    .await;
    drop(gw);
    // Redis loses everything (a restart without persistence).
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // A new node seeds its totals from ClickHouse and recreates the shared counter from them.
    let gw = gateway_with(&mock, &[&k], &extra);
    wait_metric(&gw, "aihub_limits_quota_seeded", 1.0).await;
    wait_metric(&gw, "aihub_limits_redis_up", 1.0).await;
    let r = send(&gw, &k.key, BODY, &[]).await;
    // Shown from Redis without taking anything: the earlier requests' bucket went with the
    // rest of Redis, so all 1000 remain.
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 1000);
    expect_error(r, 429, "insufficient_quota").await;
    let counted: u64 = redis::cmd("HGET")
        .arg(format!("{prefix}:q:{}:dev_reseed", current_period()))
        .arg("tokens")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, used);
}

/// `YYYY-MM` of now (UTC).
fn current_period() -> String {
    rfc3339_in(Duration::ZERO)[..7].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_at_a_quota_edge_admit_only_what_fits() {
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(dir.path(), "    included_tokens: 300\n    overage: false\n");
    let k = key("edge", &["plan: test"]);
    let gw = gateway_with(&mock, &[&k], &limits_yaml(Some(&plans), None, &[]));
    // Up to the edge: 19 × 14 = 266 of 300 tokens; the 34 left fit one reservation (31).
    for _ in 0..19 {
        assert_eq!(send(&gw, &k.key, BODY, &[]).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 100 at once, each held 300 ms upstream so they are all in flight together.
    let answers =
        join_all((0..100).map(|_| send(&gw, &k.key, BODY, &[("x-mock-latency-ms", "300")]))).await;
    let admitted = answers.iter().filter(|r| r.status() == 200).count() as u64;
    let refused = answers.iter().filter(|r| r.status() == 429).count() as u64;
    assert_eq!(admitted + refused, 100);
    // A request must fit what is left after the committed tokens and the reservations of the
    // requests in flight (its own counted first, so concurrent requests see each other's):
    // exactly one fits, and the hard stop is not passed.
    assert_eq!(admitted, 1, "admitted {admitted}");
    let used = (19 + admitted) * BODY_USAGE;
    assert!(used <= 300, "the quota was overshot: {used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_at_a_quota_edge_through_redis() {
    let mock = Mock::start(&["--threads", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(dir.path(), "    included_tokens: 300\n    overage: false\n");
    let k = key("edge2", &["plan: test"]);
    let extra = limits_yaml(Some(&plans), Some(&redis_url()), &[]);
    let (a, b) = (
        gateway_with(&mock, &[&k], &extra),
        gateway_with(&mock, &[&k], &extra),
    );
    for gw in [&a, &b] {
        wait_metric(gw, "aihub_limits_redis_up", 1.0).await;
    }
    // 19 × 14 = 266 of 300 tokens, through both nodes (the quota counter is shared); the 34
    // left fit one reservation (31).
    for i in 0..19 {
        let gw = if i % 2 == 0 { &a } else { &b };
        assert_eq!(send(gw, &k.key, BODY, &[]).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = join_all((0..100).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        send(gw, &k.key, BODY, &[("x-mock-latency-ms", "1000")])
    }))
    .await;
    let admitted = answers.iter().filter(|r| r.status() == 200).count() as u64;
    let reservation = (BODY.len() as u64).div_ceil(4) + 10;
    // Each node sees its own reservations and the shared committed total: at most one
    // request per node fits the 34 tokens left; the overshoot is bounded by the other node's
    // reservation.
    assert!((1..=2).contains(&admitted), "admitted {admitted}");
    let overshoot = ((19 + admitted) * BODY_USAGE).saturating_sub(300);
    assert!(overshoot <= (admitted - 1) * reservation);
    // Afterwards the quota is exhausted on both nodes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for gw in [&a, &b] {
        expect_error(send(gw, &k.key, BODY, &[]).await, 429, "insufficient_quota").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_with_redis_admit_the_global_limit_exactly() {
    let mock = Mock::start(&["--threads", "2"]);
    let k = key("shared", &["rate_limit_rpm: 40"]);
    let extra = limits_yaml(None, Some(&redis_url()), &[]);
    let (a, b) = (
        gateway_with(&mock, &[&k], &extra),
        gateway_with(&mock, &[&k], &extra),
    );
    for gw in [&a, &b] {
        wait_metric(gw, "aihub_limits_redis_up", 1.0).await;
    }
    let started = Instant::now();
    let body = chat("demo");
    let answers = join_all((0..120).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        gw.chat(&k.key, &body)
    }))
    .await;
    // 40/min regenerates one request every 1.5 s.
    let regenerated = (started.elapsed().as_millis() as u64) / 1500;
    let ok = answers.iter().filter(|r| r.status() == 200).count() as u64;
    assert!(
        (40..=40 + regenerated).contains(&ok),
        "admitted {ok} across two nodes (limit 40, +{regenerated} regenerated)"
    );
    let per_node = |gw: &Gateway| gw.metric("aihub_rate_limited_total{reason=\"requests\"}");
    assert_eq!(
        per_node(&a) + per_node(&b),
        (120 - ok) as f64,
        "every refusal counted on its node"
    );
}

async fn wait_metric(gw: &Gateway, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric(series) != want {
        assert!(
            Instant::now() < deadline,
            "{series} never became {want}:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis server of this test's own (to kill and restart).
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let mut r = OwnRedis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_mid_load() {
    let mut redis = OwnRedis::start();
    let mock = Mock::start(&["--threads", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_file(
        dir.path(),
        "    included_tokens: 100000000\n    overage: false\n    requests_per_minute: 600000\n",
    );
    let k = key("outage", &["plan: test"]);
    let extra = limits_yaml(Some(&plans), Some(&redis.url()), &[]);
    let (a, b) = (
        gateway_with(&mock, &[&k], &extra),
        gateway_with(&mock, &[&k], &extra),
    );
    for gw in [&a, &b] {
        wait_metric(gw, "aihub_limits_redis_up", 1.0).await;
        wait_metric(gw, "aihub_limits_nodes", 2.0).await;
    }
    let load_a = Load::start(&a, &k.key, "demo", 4, Duration::from_millis(5));
    let load_b = Load::start(&b, &k.key, "demo", 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(700)).await;

    redis.kill();
    for gw in [&a, &b] {
        wait_metric(gw, "aihub_limits_redis_up", 0.0).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.restart();
    for gw in [&a, &b] {
        wait_metric(gw, "aihub_limits_redis_up", 1.0).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (ok_a, failed_a) = load_a.stop().await;
    let (ok_b, failed_b) = load_b.stop().await;
    assert!(ok_a > 50 && ok_b > 50, "served {ok_a} + {ok_b}");
    assert_eq!(
        failed_a + failed_b,
        0,
        "no request failed because Redis did"
    );
    for gw in [&a, &b] {
        let log = gw.log_text();
        assert_eq!(
            log.matches("Redis unreachable").count(),
            1,
            "logged once per outage:\n{log}"
        );
        assert!(log.contains("Redis reachable"));
    }
    // The quota counter came back in the new Redis from the nodes' own totals (it was lost
    // with the old Redis), and usage counted during the outage was added to it.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("aihub-test-*:q:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let tokens: u64 = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("tokens")
        .query_async(&mut conn)
        .await
        .unwrap();
    let served = (ok_a + ok_b) * 20;
    assert!(
        tokens * 100 >= served * 95,
        "quota counter {tokens} tokens, {served} served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_plans_must_exist_and_limits_validate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    let k = key("bad", &["plan: nope"]);
    write(&path, &format!("keys:\n{}limits: {{}}\n", k.yaml));
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys[0].plan"), "{err}");
    write(
        &path,
        "limits:\n  redis:\n    url: \"redis://:hunter2@127.0.0.1:6379\"\n    timeout: 0s\n",
    );
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.redis.timeout"), "{err}");
    assert!(!err.contains("hunter2"));
}

mod control_plane_limits {
    //! Keys from the control-plane database: the developer's plan and overrides reach the
    //! gateway through the feed; usage alerts land in the outbox once per threshold.

    use super::*;
    use aihub_store::developers::{self, OperatorUpdate};
    use aihub_store::testing::{Backend, TestDatabase};
    use aihub_store::Store;

    async fn developer_with_key(store: &Store, plan: &str) -> (String, String) {
        let email = format!("{}@example.com", aihub_store::new_id("dev"));
        let dev = aihub_store::testing::developer(store, &email).await;
        let mut tx = store.begin_write().await.unwrap();
        developers::operator_update(
            &mut tx,
            &dev.id,
            &OperatorUpdate {
                plan: Some(plan.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let (key, _) = create_key(store, &dev.id, &[]).await;
        (dev.id, key)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn plan_changes_apply_and_alerts_fire_once_per_threshold() {
        let db = TestDatabase::new(Backend::Sqlite).await;
        let store = db.store().await;
        let dir = tempfile::tempdir().unwrap();
        let plans = dir.path().join("plans.yaml");
        write(
            &plans,
            "default_plan: metered\nalert_thresholds: [80, 100]\nplans:\n  metered:\n    \
             included_tokens: 100\n    overage: true\n  tight:\n    overage: true\n    \
             requests_per_minute: 2\n",
        );
        let (dev, key) = developer_with_key(&store, "metered").await;
        let mock = Mock::start(&[]);
        let body = config(
            &[upstream("m", &[mock.base_url()], &[])],
            &[("demo", "m", None)],
            &[],
        ) + &control_plane(&db.url, &[])
            + &limits_yaml(Some(&plans.display().to_string()), None, &[]);
        // Two nodes without Redis: each counts its own share and both cross both thresholds;
        // the database keeps one alert per threshold.
        let (a, b) = (
            Gateway::start(&body, &["threads: 2"]),
            Gateway::start(&body, &["threads: 2"]),
        );
        for i in 0..16 {
            let gw = if i % 2 == 0 { &a } else { &b };
            let r = send(gw, &key, BODY, &[]).await;
            assert_eq!(
                r.status(),
                200,
                "overage plans are not stopped at the quota"
            );
            r.bytes().await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let alerts = loop {
            // Metrics first: a metric counts an alert only after its commit, so events read
            // afterwards hold every alert the metrics counted.
            let recorded = a.metric("aihub_usage_alerts_total{result=\"recorded\"}")
                + b.metric("aihub_usage_alerts_total{result=\"recorded\"}");
            let duplicates = a.metric("aihub_usage_alerts_total{result=\"duplicate\"}")
                + b.metric("aihub_usage_alerts_total{result=\"duplicate\"}");
            if recorded + duplicates >= 4.0 || Instant::now() > deadline {
                assert_eq!(recorded, 2.0);
                assert_eq!(duplicates, 2.0);
                break aihub_store::outbox::for_developer(&store, &dev)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.event_type == "api.usage_alert")
                    .collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut thresholds: Vec<i64> = alerts
            .iter()
            .map(|e| e.payload["data"]["threshold_percent"].as_i64().unwrap())
            .collect();
        thresholds.sort_unstable();
        assert_eq!(thresholds, vec![80, 100], "{alerts:?}");
        for a in &alerts {
            aihub_webhooks::catalogue::conforms(&a.payload).unwrap();
        }
        let data = &alerts[0].payload["data"];
        assert_eq!(data["developer_id"], dev.as_str());
        assert_eq!(data["quota_tokens"], 100);
        assert!(data["period"].as_str().unwrap().len() == 7);
        assert!(alerts[0].payload["id"]
            .as_str()
            .unwrap()
            .starts_with("evt_"));

        // An operator moves the developer to a plan of 2 requests/min: within a second the
        // gateway refuses the third.
        let mut tx = store.begin_write().await.unwrap();
        developers::operator_update(
            &mut tx,
            &dev,
            &OperatorUpdate {
                plan: Some("tight".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let r = send(&a, &key, BODY, &[]).await;
            if r.headers()
                .get("x-ratelimit-limit-requests")
                .map(|v| v.as_bytes())
                == Some(b"2")
            {
                break;
            }
            assert!(Instant::now() < deadline, "plan change not applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = send(&a, &key, BODY, &[]).await;
        assert_eq!(r.status(), 200);
        expect_error(send(&a, &key, BODY, &[]).await, 429, "rate_limit_exceeded").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spend_cap_stops_overage() {
        let db = TestDatabase::new(Backend::Sqlite).await;
        let store = db.store().await;
        let dir = tempfile::tempdir().unwrap();
        let plans = dir.path().join("plans.yaml");
        write(
            &plans,
            "default_plan: paid\nplans:\n  paid:\n    included_tokens: 100\n    overage: true\n",
        );
        let (dev, key) = developer_with_key(&store, "paid").await;
        // 0.00001 USD of overage. Each request: 14 tokens at the default 0.001 USD / 1K tokens
        // = 14,000 nano-USD.
        let mut tx = store.begin_write().await.unwrap();
        developers::set_spend_cap(&mut tx, &dev, Some(10_000))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let mock = Mock::start(&[]);
        let body = config(
            &[upstream("m", &[mock.base_url()], &[])],
            &[("demo", "m", None)],
            &[],
        ) + &control_plane(&db.url, &[])
            + &limits_yaml(Some(&plans.display().to_string()), None, &[]);
        let gw = Gateway::start(&body, &[]);
        let mut ok = 0;
        let refused = loop {
            let r = send(&gw, &key, BODY, &[]).await;
            if r.status() == 429 {
                break r;
            }
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            ok += 1;
            assert!(ok < 50, "the cap never applied");
            // Each request settles before the next one's admission.
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        // 8 requests = 112 tokens, 112,000 nano-USD: the 12 tokens beyond the included 100
        // are 12,000 nano-USD of overage ≥ the cap; 7 requests (98 tokens) have none.
        assert_eq!(ok, 8);
        let e = expect_error(refused, 429, "insufficient_quota").await;
        assert!(e["message"].as_str().unwrap().contains("spend cap"), "{e}");
        assert_eq!(
            gw.metric_eventually("aihub_rate_limited_total{reason=\"spend_cap\"}", 1.0),
            1.0
        );
        // Lifting the cap (null) lets overage go on.
        let mut tx = store.begin_write().await.unwrap();
        developers::set_spend_cap(&mut tx, &dev, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while send(&gw, &key, BODY, &[]).await.status() != 200 {
            assert!(Instant::now() < deadline, "cap removal not applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
