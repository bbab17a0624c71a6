//! Endpoint health, black-box: active checks eject an endpoint that fails them (a status
//! outside `expect_status`, or a dead process) and return it once it passes again, with a slow
//! start; `/readyz` and the per-endpoint metrics say so; ejected endpoints get no client
//! requests meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CHECKS: &str =
    "health: {slow_start: 3s, check: {interval: 100ms, timeout: 1s, unhealthy: 2, healthy: 2}}";

fn gateway(endpoints: &[String], k: &TestKey) -> Gateway {
    Gateway::start(
        &config(
            &[upstream("m", endpoints, &[CHECKS])],
            &[("gpt-4o", "m", None)],
            &[k],
        ),
        &[],
    )
}

/// The `state` `/readyz` reports for endpoint `url`.
fn state(gw: &Gateway, url: &str) -> String {
    let (_, body) = http_get(gw.ops, "/readyz");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
    v["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == url)
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn wait_state(gw: &Gateway, url: &str, want: &str) -> Duration {
    let start = Instant::now();
    while state(gw, url) != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{url} never became {want}: {}",
            http_get(gw.ops, "/readyz").1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Sends `n` requests one after another; counts answers by `x-mock-server`.
async fn count(gw: &Gateway, key: &str, n: usize) -> (usize, usize) {
    let (mut a, mut b) = (0, 0);
    for _ in 0..n {
        let r = gw.chat(key, &chat("gpt-4o")).await;
        assert_eq!(r.status(), 200);
        match r.headers()["x-mock-server"].to_str().unwrap() {
            "a" => a += 1,
            _ => b += 1,
        }
        r.bytes().await.unwrap();
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_checks_is_ejected_then_returned_with_a_slow_start() {
    let a = Mock::start(&["--name", "a"]);
    let b = Mock::start(&["--name", "b"]);
    let k = key("checks", &[]);
    let gw = gateway(&[a.base_url(), b.base_url()], &k);
    assert_eq!(state(&gw, &b.base_url()), "healthy");

    // b answers 503 to everything: two failed checks (100 ms apart) eject it.
    b.fail(Some(503)).await;
    let took = wait_state(&gw, &b.base_url(), "ejected");
    assert!(took < Duration::from_secs(2), "ejected after {took:?}");
    let sent_to_b = b.received("POST /v1/chat/completions").await;
    assert_eq!(
        count(&gw, &k.key, 30).await,
        (30, 0),
        "no request goes to b"
    );
    assert_eq!(b.received("POST /v1/chat/completions").await, sent_to_b);
    let ejections = format!(
        "aihub_upstream_ejections_total{{endpoint=\"{}\",reason=\"active\",upstream=\"m\"}}",
        b.base_url()
    );
    assert_eq!(gw.metric(&ejections), 1.0);
    let healthy = format!(
        "aihub_upstream_endpoint_healthy{{endpoint=\"{}\",upstream=\"m\"}}",
        b.base_url()
    );
    assert_eq!(gw.metric(&healthy), 0.0);
    assert!(
        gw.metric(&format!(
            "aihub_upstream_health_checks_total{{endpoint=\"{}\",result=\"fail\",upstream=\"m\"}}",
            b.base_url()
        )) >= 2.0
    );

    // b recovers: two passing checks return it, first with a tenth of its share, growing.
    b.fail(None).await;
    wait_state(&gw, &b.base_url(), "healthy");
    let (_, early) = count(&gw, &k.key, 40).await;
    assert!(
        early <= 12,
        "b took {early} of 40 right after its return (half would be 20)"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, later) = count(&gw, &k.key, 100).await;
    assert!(
        (40..=60).contains(&later),
        "b took {later} of 100 after its slow start"
    );
    assert_eq!(gw.metric(&healthy), 1.0);
    // The checks were the configured request, on both endpoints.
    assert!(a.received("GET /v1/models").await >= 2);
    assert!(b.received("GET /v1/models").await >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_ejected_and_returned_when_it_comes_back() {
    let a = Mock::start(&["--name", "a"]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let b = Mock::start(&["--name", "b", "--listen", &listen]);
    let b_url = b.base_url();
    let k = key("dead", &[]);
    let gw = gateway(&[a.base_url(), b_url.clone()], &k);
    assert_eq!(count(&gw, &k.key, 10).await, (5, 5));

    drop(b); // killed
    wait_state(&gw, &b_url, "ejected");
    // Nothing is lost or slowed while it is away: no request even tries it.
    let start = Instant::now();
    assert_eq!(count(&gw, &k.key, 20).await, (20, 0));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gw.metric(&format!(
            "aihub_upstream_errors_total{{endpoint=\"{b_url}\",kind=\"connect\",upstream=\"m\"}}"
        )),
        0.0,
        "only checks met the dead endpoint"
    );

    let _b = Mock::start(&["--name", "b", "--listen", &listen]);
    wait_state(&gw, &b_url, "healthy");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, to_b) = count(&gw, &k.key, 40).await;
    assert!((15..=25).contains(&to_b), "b took {to_b} of 40 once back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_every_endpoint_and_is_not_decided_by_upstream_health() {
    let a = Mock::start(&["--name", "a"]);
    let k = key("ready", &[]);
    let gw = gateway(&[a.base_url()], &k);
    let (status, body) = http_get(gw.ops, "/readyz");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    let e = &v["upstreams"][0]["endpoints"][0];
    assert_eq!(e["url"], a.base_url());
    assert_eq!(e["addresses"][0], a.addr.to_string());
    a.fail(Some(500)).await;
    wait_state(&gw, &a.base_url(), "ejected");
    // Its only endpoint is ejected: still tried (failing closed helps nobody), still ready.
    assert_eq!(http_get(gw.ops, "/readyz").0, 200);
    let r = gw.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 500, "the provider's answer, as it came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_what_is_known_about_each_endpoint() {
    let a = Mock::start(&["--name", "a"]);
    let b = Mock::start(&["--name", "b"]);
    let k = key("reload-health", &[]);
    let gw = gateway(&[a.base_url(), b.base_url()], &k);
    b.fail(Some(503)).await;
    wait_state(&gw, &b.base_url(), "ejected");
    gw.reload();
    gw.metric_eventually("aihub_config_reloads_total{result=\"ok\"}", 1.0);
    // The new routing table starts from the old one's health, not from "all healthy".
    assert_eq!(state(&gw, &b.base_url()), "ejected");
    assert_eq!(count(&gw, &k.key, 10).await, (10, 0));
}
