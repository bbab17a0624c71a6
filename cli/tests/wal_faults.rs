//! Black-box tests of the usage WAL under faults: a `kill -9` under load loses no delivered
//! response's usage (each record is in the WAL before the response's last byte); a full disk and
//! a read-only WAL directory keep the gateway serving, with records held in memory and
//! delivered, until `memory_max_rows`; the disk cap (`wal_max_bytes`) refuses with 503 and
//! recovers. The WAL lives on a small tmpfs mounted by the test (root, as in CI).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs of `size` mounted over a fresh folder, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "mounting a tmpfs needs root (CAP_SYS_ADMIN), as CI has: run the tests as root"
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Fills the file system: every later write gets ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// `dir` made read-only by a read-only bind mount over itself, as a file system remounted
/// read-only after errors looks to new opens, renames and deletes (files open already keep
/// writing, as they would).
struct ReadOnly<'a>(&'a Path);

impl<'a> ReadOnly<'a> {
    fn new(dir: &'a Path) -> ReadOnly<'a> {
        let ok = Command::new("mount")
            .args(["--bind", "-o", "ro"])
            .arg(dir)
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "a read-only bind mount needs root (CAP_SYS_ADMIN), as CI has"
        );
        assert!(
            std::fs::write(dir.join("probe"), "x").is_err(),
            "still writable"
        );
        ReadOnly(dir)
    }
}

impl Drop for ReadOnly<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

struct Setup {
    _mock: Mock,
    gw: Gateway,
    key: TestKey,
    body: String,
}

fn start(db: &TestDb, wal: &Path, extra: &[&str]) -> Setup {
    let mock = Mock::start(&[]);
    let key = key("k", &[]);
    let body = format!(
        "{}{}",
        config(
            &[upstream("m", &[mock.base_url()], &[])],
            &[("gpt-4o", "m", None)],
            &[&key]
        ),
        db.metering_yaml(wal, extra)
    );
    let gw = Gateway::start(&body, &[]);
    Setup {
        _mock: mock,
        gw,
        key,
        body,
    }
}

/// A JSON or (odd `i`) SSE chat request; its request id if it was delivered whole.
async fn call(c: &reqwest::Client, gw: &Gateway, key: &str, i: u64) -> (u16, Option<String>) {
    let mut body = chat("gpt-4o");
    body["stream"] = (i % 2 == 1).into();
    let Ok(resp) = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    else {
        return (0, None);
    };
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await;
    let whole = match &text {
        Ok(t) if i % 2 == 1 => t.ends_with("data: [DONE]\n\n"),
        Ok(t) => serde_json::from_str::<serde_json::Value>(t).is_ok(),
        Err(_) => false,
    };
    (status, whole.then_some(id))
}

async fn calls(s: &Setup, n: u64) -> Vec<u16> {
    let c = client();
    let mut out = Vec::new();
    for i in 0..n {
        out.push(call(&c, &s.gw, &s.key.key, i).await.0);
    }
    out
}

/// Waits until ClickHouse holds `rows` usage rows and no record is held in memory.
async fn all_delivered(s: &Setup, db: &TestDb, rows: i128) {
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", rows, WAIT)
            .await,
        rows
    );
    assert_eq!(
        s.gw.metric_eventually("aihub_usage_unwritten_rows", 0.0),
        0.0
    );
}

async fn request_ids(db: &TestDb) -> Vec<String> {
    db.query("SELECT toString(request_id) FROM usage_events FORMAT TabSeparated")
        .await
        .lines()
        .map(str::to_owned)
        .collect()
}

/// 4 clients at ~110 req/s, `kill -9` mid-load, restart on the same WAL: every response a client
/// received whole has its usage row; rows beyond them are only requests the kill cut short
/// after their record was written (at most one per client), and none is there twice.
#[tokio::test]
async fn kill_9_under_load_loses_no_delivered_response() {
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let s = start(&db, wal.path(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for w in 0..4u64 {
        let (stop, delivered, failed) = (stop.clone(), delivered.clone(), failed.clone());
        let (url, key) = (s.gw.url(""), s.key.key.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let mut body = chat("gpt-4o");
                body["stream"] = (i % 2 == 1).into();
                i += 1;
                let sent = c
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await;
                let whole = match sent {
                    Ok(r) if r.status() == 200 => {
                        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
                        // A response counts once its whole body arrived.
                        match r.text().await {
                            Ok(t) if t.ends_with("data: [DONE]\n\n") || t.ends_with('}') => {
                                Some(id)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                match whole {
                    Some(id) => delivered.lock().unwrap().push(id),
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        // The gateway is gone: wait for the test to stop us.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(s.gw.pid(), "KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let delivered: Vec<String> = std::mem::take(&mut *delivered.lock().unwrap());
    let failed = failed.load(Ordering::Relaxed);
    assert!(delivered.len() > 150, "{} delivered", delivered.len());

    // Restart on the same WAL folder: what the dead process had not sent is replayed.
    let Setup { gw, body, .. } = s;
    drop(gw);
    let gw = Gateway::start(&body, &[]);
    let n = delivered.len() as i128;
    db.wait_for("SELECT count() FROM usage_events", n, WAIT)
        .await;
    // Let a replay of rows beyond the delivered ones land too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = request_ids(&db).await;
    let stored: HashSet<&String> = rows.iter().collect();
    assert_eq!(stored.len(), rows.len(), "a request id is there twice");
    let missing: Vec<&String> = delivered.iter().filter(|id| !stored.contains(id)).collect();
    eprintln!(
        "kill -9 under load: {} delivered whole, {failed} cut short, {} rows after the restart, {} delivered without a row",
        delivered.len(),
        rows.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "delivered but unmetered: {missing:?}");
    assert!(
        rows.len() - delivered.len() <= 4,
        "extra rows beyond one per client"
    );
    drop(gw);
}

/// A full disk under the WAL: requests keep being served, their records are kept in memory
/// and reach ClickHouse; once space is back the WAL is written again.
#[tokio::test]
async fn a_full_disk_keeps_serving_and_loses_nothing() {
    let fs = Tmpfs::mount("1m");
    let db = TestDb::new();
    let s = start(&db, &fs.path().join("wal"), &[]);
    assert!(calls(&s, 4).await.iter().all(|&st| st == 200));
    fs.fill();
    let during = calls(&s, 30).await;
    assert!(during.iter().all(|&st| st == 200), "{during:?}");
    assert!(s.gw.metric("aihub_usage_wal_write_failures_total") > 0.0);
    s.gw.wait_for_log("cannot write the usage WAL");
    all_delivered(&s, &db, 34).await;

    fs.free();
    // The segment that failed is closed within batch_max_age; the next one is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures = s.gw.metric("aihub_usage_wal_write_failures_total");
    assert!(calls(&s, 6).await.iter().all(|&st| st == 200));
    s.gw.wait_for_log("the usage WAL is writable again");
    assert_eq!(
        s.gw.metric("aihub_usage_wal_write_failures_total"),
        failures
    );
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", 40, WAIT)
            .await,
        40
    );
    assert_eq!(
        db.number("SELECT uniqExact(request_id) FROM usage_events")
            .await,
        40
    );
}

/// A WAL directory turned read-only mid-run (as a file system remounted read-only after disk
/// errors), then writable again.
#[tokio::test]
async fn a_read_only_wal_keeps_serving_and_recovers() {
    let wal = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let s = start(&db, wal.path(), &[]);
    assert!(calls(&s, 4).await.iter().all(|&st| st == 200));
    // Let the open segment close, so the next record needs a new file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read_only = ReadOnly::new(wal.path());
    assert!(calls(&s, 20).await.iter().all(|&st| st == 200));
    s.gw.wait_for_log("cannot write the usage WAL");
    all_delivered(&s, &db, 24).await;
    drop(read_only);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(calls(&s, 6).await.iter().all(|&st| st == 200));
    s.gw.wait_for_log("the usage WAL is writable again");
    all_delivered(&s, &db, 30).await;
}

/// Disk full and ClickHouse down together: records held in memory are capped by
/// `memory_max_rows` (503 `metering_unavailable` past it, unrecorded); ClickHouse back, they are
/// delivered and requests are served again. Then the disk cap `wal_max_bytes` does the same
/// with the disk writable.
#[tokio::test]
async fn memory_and_disk_caps_refuse_then_recover() {
    let ch = PrivateClickHouse::start();
    let db = TestDb::on(&ch.url);
    let fs = Tmpfs::mount("1m");
    let extra = [
        "memory_max_rows: 5",
        "wal_max_bytes: 4000",
        "retry_backoff_max: 500ms",
    ];
    let s = start(&db, &fs.path().join("wal"), &extra);
    assert!(calls(&s, 2).await.iter().all(|&st| st == 200));
    db.wait_for("SELECT count() FROM usage_events", 2, WAIT)
        .await;

    ch.stop();
    fs.fill();
    let statuses = calls(&s, 8).await;
    assert_eq!(statuses[..5], [200; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [503; 3], "{statuses:?}");
    expect_error(
        s.gw.chat(&s.key.key, &chat("gpt-4o")).await,
        503,
        "metering_unavailable",
    )
    .await;
    assert_eq!(s.gw.metric("aihub_usage_unwritten_rows"), 5.0);

    ch.restart();
    all_delivered(&s, &db, 7).await;
    assert_eq!(calls(&s, 1).await, [200]);

    // The disk cap: ClickHouse down with the disk writable, records pile up in the WAL.
    fs.free();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ch.stop();
    let mut served = 0;
    let mut refused = 0;
    for status in calls(&s, 40).await {
        match status {
            200 if refused == 0 => served += 1,
            503 => refused += 1,
            other => panic!("unexpected {other} (served {served}, refused {refused})"),
        }
    }
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    assert!(s.gw.metric("aihub_usage_wal_bytes") > 4000.0);
    ch.restart();
    let want = 8 + served;
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", want, WAIT)
            .await,
        want
    );
    assert_eq!(s.gw.metric_eventually("aihub_usage_wal_bytes", 0.0), 0.0);
    assert_eq!(calls(&s, 1).await, [200]);
    // Refusals were never recorded.
    assert_eq!(
        db.number("SELECT count() FROM usage_events WHERE status = 503")
            .await,
        0
    );
}
