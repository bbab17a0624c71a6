//! Webhook delivery survives the admin process dying: `kill -9` of `aihub admin` in the middle
//! of a backlog, then a new start on the same database: every event is delivered (at least
//! once; duplicates only for attempts that were in flight), none lost.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aihub_store::testing::{Backend, TestDatabase};
use aihub_webhooks::testing::{Receiver, Reply};
use common::admin::Admin;
use common::signal;
use serde_json::json;

const EXTRA: &str = "webhooks: {allow_http: true, allow_networks: [\"127.0.0.0/8\"], \
    timeout: 2s, lease: 4s, poll_interval: 50ms, retry_schedule: [0s, 300ms, 300ms]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backlog_loses_no_event() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDatabase::new(backend).await;
        // Slow enough that the backlog is still draining when the process dies.
        let rx = Receiver::start().await;
        rx.then(Reply::status(200).delay(Duration::from_millis(20)));
        let mut admin = Admin::start(&db.url, EXTRA);
        let token = admin.sign_up("ada@example.com").await;
        let (s, b) = admin
            .call(
                "POST",
                "/developer/webhooks",
                Some(&token),
                Some(json!({"url": rx.url("/h"), "event_types": ["*"]})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let store = db.store().await;
        let dev = aihub_store::developers::by_email(&store, "ada@example.com")
            .await
            .unwrap()
            .expect("signed up")
            .id;
        const N: usize = 600;
        let mut ids = Vec::with_capacity(N);
        for chunk in 0..N / 100 {
            let mut tx = store.begin_write().await.unwrap();
            for i in 0..100 {
                ids.push(
                    aihub_store::outbox::enqueue(
                        &mut tx,
                        "api.usage_alert",
                        Some(&dev),
                        json!({"n": chunk * 100 + i}),
                    )
                    .await
                    .unwrap(),
                );
            }
            tx.commit().await.unwrap();
        }
        // Dies with part of the backlog delivered, part leased, part waiting.
        rx.wait_for(N / 4, Duration::from_secs(20)).await;
        signal(admin.pid(), "KILL");
        for _ in 0..100 {
            if !admin.running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at_kill = rx.count();
        assert!(at_kill < N, "the backlog drained before the kill");
        let _again = Admin::start(&db.url, EXTRA);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen: HashMap<String, usize> = HashMap::new();
        loop {
            seen.clear();
            for r in rx.received() {
                if r.path == "/h" {
                    *seen.entry(r.header("webhook-id").to_owned()).or_default() += 1;
                }
            }
            if ids.iter().all(|id| seen.contains_key(id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: {} of {N} events delivered after the restart",
                ids.iter().filter(|id| seen.contains_key(*id)).count()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key_events = seen.len() - N;
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        eprintln!(
            "{backend:?}: {at_kill} of {N} delivered at the kill; all {N} after the restart, \
             {duplicates} duplicates (in flight at the kill), {key_events} other events"
        );
        // Only what was in flight (bounded by the endpoint's concurrency) may come twice.
        assert!(duplicates <= 16, "{duplicates} duplicates");
    }
}

/// A receiver written as a developer would, in Python with the official `standardwebhooks`
/// package (`e2e/webhook_receiver.py`), verifies every request the real admin process sends;
/// a request signed with another secret is rejected by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_verifier_accepts_our_signatures() {
    use std::io::{BufRead, BufReader};
    let python = common::test_tool("AIHUB_TEST_PYTHON", "python3");
    let db = TestDatabase::new(Backend::Sqlite).await;
    let admin = Admin::start(&db.url, EXTRA);
    let token = admin.sign_up("py@example.com").await;
    let port = common::free_port();
    let (s, hook) = admin
        .call(
            "POST",
            "/developer/webhooks",
            Some(&token),
            Some(json!({"url": format!("http://127.0.0.1:{port}/hook"), "event_types": ["*"]})),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap();
    let mut child = std::process::Command::new(&python)
        .arg(common::repo_root().join("e2e/webhook_receiver.py"))
        .arg(port.to_string())
        .env("AIHUB_WEBHOOK_SECRET", secret)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e} (source deploy/local/test-tools.sh)"));
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let out = child.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the Python receiver exited ({status}): {python} needs the standardwebhooks \
                 package ({})",
                common::TEST_TOOLS_HINT
            );
        }
        assert!(
            Instant::now() < deadline,
            "the Python receiver did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = hook["id"].as_str().unwrap();
    admin.create_key(&token, json!({"name": "k"})).await;
    admin
        .call(
            "POST",
            &format!("/developer/webhooks/{id}/test"),
            Some(&token),
            None,
        )
        .await;
    // A forged request: signed with another secret.
    let forged = aihub_webhooks::signature::sign(
        &[&aihub_webhooks::signature::new_secret()],
        "evt_forged",
        aihub_store::now_ms() / 1000,
        b"{\"type\":\"webhook.test\"}",
    );
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/hook"))
        .header("webhook-id", "evt_forged")
        .header("webhook-timestamp", forged.timestamp)
        .header("webhook-signature", forged.standard)
        .body("{\"type\":\"webhook.test\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = lines.lock().unwrap().clone();
        let verified = |t: &str| {
            got.iter()
                .any(|l| l.starts_with(&format!("verified {t} evt_")))
        };
        // The receiver prints the forged request's line when it has answered it, which the
        // reader may see after the verified ones: wait for all three.
        let rejected = got.iter().any(|l| l.starts_with("rejected"));
        if verified("api_key.created") && verified("webhook.test") && rejected {
            assert!(
                got.iter()
                    .all(|l| l.starts_with("verified") || l.contains("rejected")),
                "{got:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "Python receiver output: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
