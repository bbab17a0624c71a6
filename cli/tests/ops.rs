//! Black-box tests of operations: configuration checks and errors, SIGHUP reload under load,
//! the ops listener, `aihub keys`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn check_config(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    write(&path, yaml);
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn config_errors_name_the_file_and_key() {
    let (ok, text) = check_config("upstreams:\n  u:\n    endpoints: [http://127.0.0.1:1/v1]\nroutes:\n  - {model: m, upstream: u}\n");
    assert!(ok, "{text}");
    assert!(text.contains("ok (1 routes, 0 keys)"), "{text}");
    for (yaml, key) in [
        (
            "server:\n  listne: []\n",
            "server.listne: unknown field `listne`",
        ),
        (
            "upstreams:\n  u:\n    endpoints: [\"gopher://x\"]\n",
            "upstreams.u.endpoints[0]",
        ),
        (
            "routes:\n  - {model: m, upstream: nowhere}\n",
            "routes[0].upstream",
        ),
        (
            "upstreams:\n  u:\n    endpoints: [http://h]\n    connect_timeout: soon\n",
            "upstreams.u.connect_timeout",
        ),
        (
            "keys:\n  - {id: a, hash: \"sha256:00\", developer_id: d}\n",
            "keys[0].hash",
        ),
        (
            "keys:\n  - {id: a, hash: \"sha256:00\", developer_id: d, models: [\"a*b\"]}\n",
            "keys[0]",
        ),
    ] {
        let (ok, text) = check_config(yaml);
        assert!(!ok, "accepted: {yaml}");
        assert!(
            text.contains("bad.yaml: ") && text.contains(key),
            "{key} not named in: {text}"
        );
    }
    // Starting the gateway with a bad file fails the same way.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    write(&path, "routes:\n  - {model: m, upstream: nowhere}\n");
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].upstream"));
}

#[tokio::test]
async fn sighup_reload_under_load_fails_no_request() {
    let mock = Mock::start(&["--threads", "2"]);
    let k = key("k", &[]);
    let up = [upstream("m", &[mock.base_url()], &[])];
    let gw = Gateway::start(
        &config(&up, &[("mock-gpt", "m", None)], &[&k]),
        &["threads: 2"],
    );
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let (server_section, _) = original.split_once("upstreams:").unwrap();
    let k2 = key("k2", &[]);
    let reloaded = format!(
        "{server_section}{}",
        config(
            &up,
            &[("mock-gpt", "m", None), ("added", "m", Some("mock-gpt"))],
            &[&k, &k2]
        )
    );

    let load = Load::start(&gw, &k.key, "mock-gpt", 8, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..6 {
        let text = match round % 3 {
            0 => reloaded.clone(),
            1 => format!("{reloaded}\nthis is: [not valid"), // rejected: the old config keeps serving
            _ => original.clone(),
        };
        write(&gw.config_path(), &text);
        gw.reload();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    write(&gw.config_path(), &reloaded);
    gw.reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.stop().await;
    assert!(ok > 100, "only {ok} requests in the test");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during reloads",
        ok + failed
    );
    assert_eq!(
        gw.metric_eventually("aihub_config_reloads_total{result=\"ok\"}", 5.0),
        5.0
    );
    assert_eq!(
        gw.metric_eventually("aihub_config_reloads_total{result=\"error\"}", 2.0),
        2.0
    );
    // The new route and the new key serve.
    let resp = gw.chat(&k2.key, &chat("added")).await;
    assert_eq!(resp.status(), 200);
    assert!(gw.log_text().contains("configuration reload rejected"));
}

#[tokio::test]
async fn reload_removes_keys_and_routes() {
    let mock = Mock::start(&[]);
    let (k1, k2) = (key("k1", &[]), key("k2", &[]));
    let up = [upstream("m", &[mock.base_url()], &[])];
    let gw = Gateway::start(
        &config(&up, &[("a", "m", None), ("b", "m", None)], &[&k1, &k2]),
        &[],
    );
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let (server_section, _) = text.split_once("upstreams:").unwrap();
    write(
        &gw.config_path(),
        &format!(
            "{server_section}{}",
            config(&up, &[("a", "m", None)], &[&k1])
        ),
    );
    gw.reload();
    let send = |key: &str, model: &str| {
        gw.post(key, "/v1/chat/completions")
            .json(&chat(model))
            .send()
    };
    let mut removed = false;
    for _ in 0..50 {
        if send(&k2.key, "a").await.unwrap().status() == 401 {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(removed, "the removed key still works");
    expect_error(send(&k1.key, "b").await.unwrap(), 404, "model_not_found").await;
    assert_eq!(send(&k1.key, "a").await.unwrap().status(), 200);
    assert_eq!(gw.metric("aihub_keys_loaded"), 1.0);
}

#[tokio::test]
async fn ops_listener_serves_health_and_metrics() {
    let mock = Mock::start(&[]);
    let k = key("k", &[]);
    let gw = Gateway::start(
        &config(
            &[upstream("m", &[mock.base_url()], &[])],
            &[("mock-gpt", "m", None)],
            &[&k],
        ),
        &[],
    );
    assert_eq!(http_get(gw.ops, "/healthz").0, 200);
    assert_eq!(http_get(gw.ops, "/readyz").0, 200);
    assert_eq!(http_get(gw.ops, "/nope").0, 404);
    let resp = gw.chat(&k.key, &chat("mock-gpt")).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    gw.metric_eventually(
        "aihub_requests_total{model=\"mock-gpt\",status=\"200\"}",
        1.0,
    );
    let m = gw.metrics();
    for series in [
        "aihub_requests_total{model=\"mock-gpt\",status=\"200\"} 1",
        "aihub_request_duration_seconds_count{model=\"mock-gpt\"} 1",
        "aihub_gateway_overhead_seconds_count 1",
        "aihub_upstream_latency_seconds_count{upstream=\"m\"} 1",
        "aihub_in_flight_requests 0",
        "aihub_keys_loaded 1",
    ] {
        assert!(m.contains(series), "missing `{series}` in:\n{m}");
    }
}

#[test]
fn keys_generate_prints_a_working_entry() {
    let out = Command::new(BIN)
        .args([
            "keys",
            "generate",
            "--id",
            "key_x",
            "--developer",
            "dev_x",
            "--model",
            "demo",
            "--expires-in",
            "30d",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("# ahub_dev_"))
        .map(|rest| format!("ahub_dev_{rest}"))
        .expect("key printed");
    let hash = aihub_apikey::parse(&key).unwrap().to_hex();
    assert!(text.contains(&format!("hash: sha256:{hash}")));
    assert!(text.contains("models: [\"demo\"]") && text.contains("expires_at: "));
    // `keys hash` agrees, and refuses malformed keys.
    let hashed = |input: &str| {
        let mut child = Command::new(BIN)
            .args(["keys", "hash"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = hashed(&format!("{key}\n"));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("sha256:{hash}")
    );
    assert!(!hashed("ahub_dev_nope\n").status.success());
    // The printed entry is valid configuration.
    let entry: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("  {l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    write(&path, &format!("keys:\n{entry}"));
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
