//! How a gateway ends and hands over, black-box: SIGTERM turns `/readyz` to 503, lets a stream
//! in flight finish, delivers its usage and exits long before the grace period; `--upgrade`
//! takes the listening sockets of the running gateway under load with no failed request, and
//! every successful request has exactly one usage row (the two processes share the WAL folder).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn body(mock: &Mock, k: &TestKey, db: &TestDb, wal: &std::path::Path) -> String {
    format!(
        "{}{}",
        config(
            &[upstream("mock", &[mock.base_url()], &[])],
            &[("demo", "mock", None)],
            &[k]
        ),
        db.metering_yaml(wal, &[])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_finish_delivers_its_usage_and_exits_early() {
    let mock = Mock::start(&[]);
    let k = key("drain", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(
        &body(&mock, &k, &db, wal.path()),
        &["shutdown_grace_period: 30s", "drain_delay: 500ms"],
    );
    let mut req = chat("demo");
    req["stream"] = true.into();
    let stream = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&k.key)
        .header("x-mock-chunks", "20")
        .header("x-mock-chunk-interval-ms", "100")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let signalled = Instant::now();
    signal(gw.pid(), "TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        http_get(gw.ops, "/readyz").0,
        503,
        "not ready while draining"
    );
    let text = stream.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(20)));
    let took = signalled.elapsed();
    eprintln!("SIGTERM with a 2 s stream in flight: exited after {took:?}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(took < Duration::from_secs(10), "exited after {took:?}");
    // Delivered before the exit, not left in the WAL.
    assert_eq!(
        db.number("SELECT count() FROM usage_events WHERE key_id = 'drain' AND streamed = 1")
            .await,
        1
    );
    assert!(
        gw.log_text().contains("drained"),
        "{}",
        last_lines(&gw.log_text(), 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_fails_no_request_and_meters_each_once() {
    let mock = Mock::start(&[]);
    let k = key("upgrade", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let pid_file = run.path().join("gateway.pid");
    let mut old = Gateway::start(
        &body(&mock, &k, &db, wal.path()),
        &[
            "shutdown_grace_period: 20s",
            &format!("pid_file: \"{}\"", pid_file.display()),
            &format!(
                "upgrade_sock: \"{}\"",
                run.path().join("upgrade.sock").display()
            ),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old.pid().to_string()
    );
    let load = Load::start(&old, &k.key, "demo", 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let log = std::fs::File::create(run.path().join("new.log")).unwrap();
    let mut new = Stopped(
        Command::new(BIN)
            .args(["gateway", "--upgrade", "--config"])
            .arg(old.config_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let new = &mut new.0;
    let upgraded = Instant::now();
    let old_status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(30)));
    eprintln!(
        "the old gateway exited {:?} after the upgrade started",
        upgraded.elapsed()
    );
    assert!(old_status.is_some_and(|s| s.success()), "{old_status:?}");
    // The new process serves alone now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = load.stop().await;
    let new_log = std::fs::read_to_string(run.path().join("new.log")).unwrap();
    assert!(
        matches!(new.try_wait(), Ok(None)),
        "the new gateway died: {}",
        last_lines(&new_log, 20)
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new.id().to_string()
    );
    eprintln!("load during the upgrade: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{ok} ok");
    assert!(ok > 100, "{ok}");
    let rows = db
        .wait_for(
            "SELECT count() FROM usage_events WHERE key_id = 'upgrade' AND status = 200",
            ok as i128,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(rows, ok as i128);
    assert_eq!(
        db.number("SELECT uniqExact(request_id) FROM usage_events WHERE key_id = 'upgrade'")
            .await,
        db.number("SELECT count() FROM usage_events WHERE key_id = 'upgrade'")
            .await
    );
}

/// A child process killed when the test ends, passed or not.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
