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
