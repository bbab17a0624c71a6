//! Several nodes, black-box: three gateways and two admin API processes on one PostgreSQL,
//! Redis and ClickHouse, behind nginx (`proxy_next_upstream error timeout`, never a POST sent
//! twice). A key's rate limit holds across the three gateways; a revocation through either
//! admin reaches every gateway within a second; a gateway killed with SIGKILL under load costs
//! at most the requests in flight on it, and once it restarts on its WAL every successful
//! request has one usage row (none twice); rows beyond the successes are requests the kill cut
//! after their record was written (at most one per client in flight on it).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aihub_store::testing::{Backend, TestDatabase};
use common::admin::Admin;
use common::*;
use serde_json::json;

/// nginx balancing over `backends` (round robin, keep-alive to them), on a free port.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(backends: &[SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        let servers: String = backends
            .iter()
            .map(|b| format!("    server {b} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        let conf = format!(
            "user root;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 upstream gateways {{\n{servers}    keepalive 32;\n  }}\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
             \x20     proxy_pass http://gateways;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             \x20     proxy_next_upstream error timeout;\n      proxy_next_upstream_tries 3;\n\
             \x20     proxy_connect_timeout 2s;\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx = test_tool("AIHUB_TEST_NGINX", "/usr/sbin/nginx");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nginx: {e}; {TEST_TOOLS_HINT}"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_url() -> String {
    std::env::var("AIHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A gateway of the cluster: keys from the control plane (pushed through Redis), limits in
/// Redis under `prefix`, usage into `ch` through its own WAL folder `wal`.
fn node(mock: &Mock, db_url: &str, prefix: &str, ch: &TestDb, wal: &Path, plans: &Path) -> Gateway {
    let mut body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        &[],
    );
    body.push_str(&control_plane(
        db_url,
        &[&format!("redis_url: \"{}\"", redis_url())],
    ));
    body.push_str(&format!(
        "limits:\n  default_max_tokens: 1024\n  plans_file: \"{}\"\n  \
         redis: {{url: \"{}\", prefix: \"{prefix}\", timeout: 1s}}\n",
        plans.display(),
        redis_url()
    ));
    body.push_str(&ch.metering_yaml(wal, &["flush_interval: 5ms"]));
    Gateway::start(&body, &[])
}

async fn status(url: &str, key: &str) -> u16 {
    client()
        .post(url)
        .bearer_auth(key)
        .json(&chat("demo"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_two_admins_behind_nginx() {
    let db = TestDatabase::new(Backend::Postgres).await;
    let ch = TestDb::new();
    let admin_extra = format!("redis: {{url: \"{}\"}}\n", redis_url());
    let admins = [
        Admin::start(&db.url, &admin_extra),
        Admin::start(&db.url, &admin_extra),
    ];
    let session = admins[0].sign_up("nodes@aihub.test").await;
    let (limited, _) = admins[0]
        .create_key(&session, json!({"name": "limited", "rate_limit_rpm": 60}))
        .await;
    let (busy, busy_id) = admins[1]
        .create_key(&session, json!({"name": "busy"}))
        .await;
    let (revoked, revoked_id) = admins[1]
        .create_key(&session, json!({"name": "revoked"}))
        .await;

    let mock = Mock::start(&[]);
    let prefix = format!("aihub-nodes-{}", std::process::id());
    // The developer's plan limits nothing, so the keys' own limits are what the test sees.
    let plans_dir = tempfile::tempdir().unwrap();
    let plans = plans_dir.path().join("plans.yaml");
    write(
        &plans,
        "default_plan: free\nplans:\n  free:\n    display_name: Free\n    monthly_price_usd: 0\n    \
         included_tokens: 1000000000\n    overage: false\n",
    );
    let wals: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut gateways: Vec<Gateway> = wals
        .iter()
        .map(|w| node(&mock, &db.url, &prefix, &ch, w.path(), &plans))
        .collect();
    let lb = Nginx::start(&gateways.iter().map(|g| g.addr).collect::<Vec<_>>());
    let url = lb.url("/v1/chat/completions");

    // One limit for the key, whichever gateway nginx picks: 60 a minute, not 60 per node.
    let mut handles = Vec::new();
    for _ in 0..90 {
        let (url, key) = (url.clone(), limited.clone());
        handles.push(tokio::spawn(async move { status(&url, &key).await }));
    }
    let mut ok = 0;
    for h in handles {
        match h.await.unwrap() {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    eprintln!("rate limit 60/min across 3 gateways: {ok} of 90 admitted");
    assert!((60..=63).contains(&ok), "{ok} admitted");

    // A revocation through the other admin reaches every gateway within a second.
    for g in &gateways {
        assert_eq!(status(&g.url("/v1/chat/completions"), &revoked).await, 200);
    }
    let started = Instant::now();
    let (s, _) = admins[1]
        .call(
            "DELETE",
            &format!("/developer/keys/{revoked_id}"),
            Some(&admins[1].login("nodes@aihub.test").await),
            None,
        )
        .await;
    assert!(s == 200 || s == 204, "{s}");
    let revoke_start = Instant::now();
    let mut reached = Vec::new();
    for g in &gateways {
        while g.get(&revoked, "/v1/models").await.status() != 401 {
            assert!(
                revoke_start.elapsed() < Duration::from_secs(5),
                "revocation did not reach {}",
                g.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reached.push(started.elapsed());
    }
    eprintln!("revocation reached the gateways after {reached:?}");
    assert!(
        reached.iter().all(|d| *d < Duration::from_secs(1)),
        "{reached:?}"
    );

    // Load through nginx; one gateway is killed with SIGKILL in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let (okc, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, okc, failed, url, key) = (
                stop.clone(),
                okc.clone(),
                failed.clone(),
                url.clone(),
                busy.clone(),
            );
            tokio::spawn(async move {
                let c = client();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut body = chat("demo");
                    body["stream"] = (i + w).is_multiple_of(2).into();
                    i += 1;
                    let good = match c.post(&url).bearer_auth(&key).json(&body).send().await {
                        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if good { &okc } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(gateways[1].pid(), "KILL");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (okc.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("load through nginx with one gateway killed: {ok} ok, {failed} failed");
    assert!(
        failed <= 4,
        "{failed} failed: more than the 4 requests in flight"
    );
    assert!(ok > 100, "{ok}");

    // The killed gateway comes back on its WAL folder: its records are delivered.
    gateways[1] = node(&mock, &db.url, &prefix, &ch, wals[1].path(), &plans);
    let busy_rows = |what: &str| {
        format!("SELECT {what} FROM usage_events WHERE key_id = '{busy_id}' AND status = 200")
    };
    let rows = ch
        .wait_for(&busy_rows("count()"), ok as i128, Duration::from_secs(30))
        .await;
    eprintln!("usage rows of the load's key: {rows} for {ok} successful requests");
    // Every success is metered: its record was in the WAL before its last byte. A request the
    // kill cut after its record was written has a row too (at most one per client in flight).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = ch.number(&busy_rows("count()")).await;
    assert!(
        rows >= ok as i128,
        "fewer rows than successes: {rows} < {ok}"
    );
    assert!(rows - ok as i128 <= 4, "{rows} rows for {ok} successes");
    assert_eq!(ch.number(&busy_rows("uniqExact(request_id)")).await, rows);
}
