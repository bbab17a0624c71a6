//! Load balancing across an upstream's endpoints, black-box: weighted round robin holds its
//! weights within ±5 % over 10,000 requests; `least_in_flight` and `latency` send most
//! requests to the faster of two endpoints.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;

fn gateway(upstream_extra: &[&str], endpoints: &[String], k: &TestKey) -> Gateway {
    Gateway::start(
        &config(
            &[upstream("m", endpoints, upstream_extra)],
            &[("gpt-4o", "m", None)],
            &[k],
        ),
        &[],
    )
}

/// Sends `n` requests from `clients` concurrent clients; counts answers by `x-mock-server`.
async fn spread(gw: &Arc<Gateway>, key: &str, n: usize, clients: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (gw, key) = (Arc::clone(gw), key.to_owned());
        let share = n / clients + usize::from(c < n % clients);
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..share {
                let r = gw.chat(&key, &chat("gpt-4o")).await;
                assert_eq!(r.status(), 200);
                let server = r.headers()["x-mock-server"].to_str().unwrap().to_owned();
                r.bytes().await.unwrap();
                *seen.entry(server).or_default() += 1;
            }
            seen
        }));
    }
    let mut total = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_within_five_percent_over_ten_thousand_requests() {
    let a = Mock::start(&["--name", "a"]);
    let b = Mock::start(&["--name", "b"]);
    let k = key("weights", &[]);
    let gw = Arc::new(gateway(
        &["weights: [3, 1]"],
        &[a.base_url(), b.base_url()],
        &k,
    ));
    let seen = spread(&gw, &k.key, 10_000, 8).await;
    let (got_a, got_b) = (seen["a"], seen["b"]);
    assert_eq!(got_a + got_b, 10_000);
    assert!(
        got_a.abs_diff(7_500) <= 375,
        "a got {got_a} of 10,000 (expected 7,500 ± 5 %)"
    );
    assert!(
        got_b.abs_diff(2_500) <= 125,
        "b got {got_b} of 10,000 (expected 2,500 ± 5 %)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_in_flight_and_latency_prefer_the_faster_endpoint() {
    for strategy in ["least_in_flight", "latency"] {
        let slow = Mock::start(&["--name", "slow", "--latency", "100ms"]);
        let fast = Mock::start(&["--name", "fast"]);
        let k = key(strategy, &[]);
        let gw = Arc::new(gateway(
            &[&format!("balance: {strategy}")],
            &[slow.base_url(), fast.base_url()],
            &k,
        ));
        let seen = spread(&gw, &k.key, 400, 8).await;
        let fast_share = seen.get("fast").copied().unwrap_or(0);
        assert!(
            fast_share >= 320,
            "{strategy}: the fast endpoint got {fast_share} of 400 ({seen:?})"
        );
    }
}
