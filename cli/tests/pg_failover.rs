//! Black-box test of a PostgreSQL failover under control-plane writes (issue 21, item 4): a
//! private primary and a synchronous streaming standby (Debian's PostgreSQL 15 binaries), a TCP
//! proxy in front as the "virtual IP", the real `aihub admin` and `aihub gateway` on it. Writes
//! flow through the admin HTTP API while the primary is killed (SIGKILL of the whole server, as
//! a crashed machine), the standby is promoted and the proxy switched to it.
//!
//! Proven: clients get clean errors (5xx, the `{"error":{…}}` shape, no hang) during the gap; the
//! admin recovers without a restart; every acknowledged write is on the new primary
//! (`synchronous_standby_names`); no write is half-applied (a key without its outbox event, an
//! event without its key, a revocation without its event); the gateway's key sync goes on.
//!
//! And with an asynchronous standby that misses the last commits: the gateway, which had read
//! them on the old primary, follows the new primary's state (a key lost in the failover stops
//! serving, a revocation lost serves the key again) instead of keeping what no database holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin::Admin;
use common::faultproxy::FaultProxy;
use common::*;
use serde_json::{json, Value};

/// The tests of this file run one at a time (each loads the machine; one measures latency).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server binaries: `AIHUB_TEST_PG_BIN`, else Debian's newest `/usr/lib/postgresql/N/bin`.
fn pg_bin() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("AIHUB_TEST_PG_BIN") {
        return dir.into();
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max();
    let version = newest.expect("no /usr/lib/postgresql/N: install Debian's postgresql");
    format!("/usr/lib/postgresql/{version}/bin").into()
}

/// A PostgreSQL tool, run as `postgres` when the test runs as root (the server refuses root).
fn pg(tool: &str) -> Command {
    let bin = pg_bin().join(tool);
    assert!(
        bin.exists(),
        "{} missing: install Debian's postgresql",
        bin.display()
    );
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One PostgreSQL server in `dir`, on `port`.
struct Node {
    dir: PathBuf,
    port: u16,
}

impl Node {
    fn start(&self) {
        let mut c = pg("pg_ctl");
        c.arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.with_extension("log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null());
        run(c, "pg_ctl start");
    }

    fn sql(&self, sql: &str) -> String {
        let out = pg("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// SIGKILL of the postmaster and every server process (stopped first, so it cannot react).
    fn crash(&self) {
        let pid_file = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap();
        let pm = pid_file.lines().next().unwrap().trim().to_owned();
        signal(pm.parse().unwrap(), "STOP");
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid …
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split(' ').nth(1));
            if ppid == Some(pm.as_str()) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse() {
                    signal(pid, "KILL");
                }
            }
        }
        signal(pm.parse().unwrap(), "KILL");
    }

    fn stop(&self) {
        let _ = pg("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A primary and its streaming standby in a temporary directory; both stopped on drop.
struct Pair {
    _base: tempfile::TempDir,
    primary: Node,
    standby: Node,
}

impl Pair {
    /// A primary on `port` and its standby, synchronous (an acknowledged commit is on the
    /// standby) or not; the standby streams from `stream_via` (a proxy to the primary) if given.
    fn start(port: u16, synchronous: bool, stream_via: Option<u16>) -> Pair {
        let base = tempfile::tempdir().unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(base.path());
                    c
                },
                "chown",
            );
        }
        let primary = Node {
            dir: base.path().join("primary"),
            port,
        };
        let standby = Node {
            dir: base.path().join("standby"),
            port: free_port(),
        };
        let mut c = pg("initdb");
        c.arg("-D")
            .arg(&primary.dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null());
        run(c, "initdb");
        let common = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 60\nshared_buffers = 16MB\nfsync = off\n\
             wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n",
            base.path().display()
        );
        let sync = if synchronous {
            "synchronous_standby_names = '*'\nsynchronous_commit = on\n"
        } else {
            ""
        };
        append(
            &primary.dir.join("postgresql.conf"),
            &format!("{common}port = {}\n{sync}", primary.port),
        );
        let pair = Pair {
            _base: base,
            primary,
            standby,
        };
        pair.primary.start();
        let mut c = pg("pg_basebackup");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream"])
            .args(["-c", "fast", "--no-sync", "-p"])
            .arg(pair.primary.port.to_string())
            .arg("-D")
            .arg(&pair.standby.dir);
        run(c, "pg_basebackup");
        // Promoted, it must not wait for a standby of its own.
        append(
            &pair.standby.dir.join("postgresql.conf"),
            &format!(
                "port = {}\nsynchronous_standby_names = ''\n",
                pair.standby.port
            ),
        );
        if let Some(via) = stream_via {
            // After the line `-R` wrote: the later setting wins.
            append(
                &pair.standby.dir.join("postgresql.auto.conf"),
                &format!("primary_conninfo = 'host=127.0.0.1 port={via} user=postgres'\n"),
            );
        }
        pair.standby.start();
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = if synchronous { "sync" } else { "async" };
        while pair
            .primary
            .sql("SELECT sync_state FROM pg_stat_replication")
            != want
        {
            assert!(
                Instant::now() < deadline,
                "the standby never streamed ({want})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.standby.stop();
        self.primary.stop();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// One admin API call's outcome, as a writer saw it.
#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    took: Duration,
    status: u16,
    body: Value,
}

#[derive(Default)]
struct Log {
    /// Key id → (the key, its writer, the highest acknowledged rename, the highest attempted
    /// rename).
    keys: std::collections::BTreeMap<String, (String, usize, i64, i64)>,
    /// Keys whose revocation was acknowledged.
    revoked: Vec<String>,
    outcomes: Vec<Outcome>,
}

/// One call with a hard bound (a hang is a failure, reported as status 0).
async fn call(
    c: &reqwest::Client,
    method: &str,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Outcome {
    let at = Instant::now();
    let mut req = c
        .request(method.parse().unwrap(), url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let (status, body) = match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({ "transport": e.to_string() })),
    };
    Outcome {
        at,
        took: at.elapsed(),
        status,
        body,
    }
}

/// Creates a key, renames it, and revokes every third one, until `stop`.
async fn writer(
    base: String,
    token: String,
    w: usize,
    log: Arc<Mutex<Log>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let c = client();
    let mut mine: Vec<String> = Vec::new();
    let mut i = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        // At most 60 live keys (the cap is 100 per developer).
        if mine.len() < 60 {
            let o = call(
                &c,
                "POST",
                format!("{base}/developer/keys"),
                &token,
                Some(json!({"name": format!("w{w}-{i}")})),
            )
            .await;
            let mut l = log.lock().unwrap();
            if o.status == 201 {
                let id = o.body["api_key"]["id"].as_str().unwrap().to_owned();
                let key = o.body["key"].as_str().unwrap().to_owned();
                l.keys.insert(id.clone(), (key, w, 0, 0));
                mine.push(id);
            }
            l.outcomes.push(o);
        }
        if let Some(id) = mine.last().cloned() {
            log.lock().unwrap().keys.get_mut(&id).unwrap().3 = i;
            let o = call(
                &c,
                "PUT",
                format!("{base}/developer/keys/{id}"),
                &token,
                Some(json!({"name": format!("w{w}-renamed-{i}")})),
            )
            .await;
            let mut l = log.lock().unwrap();
            if o.status == 200 {
                let k = l.keys.get_mut(&id).unwrap();
                k.2 = k.2.max(i);
            }
            l.outcomes.push(o);
        }
        if i % 3 == 0 && mine.len() > 1 {
            // Taken off the list only once acknowledged (a failed revocation is tried again).
            let id = mine[0].clone();
            let o = call(
                &c,
                "DELETE",
                format!("{base}/developer/keys/{id}"),
                &token,
                None,
            )
            .await;
            let mut l = log.lock().unwrap();
            if o.status == 204 {
                mine.remove(0);
                l.revoked.push(id);
            }
            l.outcomes.push(o);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_mid_writes_then_standby_promoted_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let pair = Pair::start(free_port(), true, None);
    let vip = FaultProxy::start(format!("127.0.0.1:{}", pair.primary.port).parse().unwrap()).await;
    let url = format!("postgres://postgres@{}/postgres", vip.addr);
    let admin = Admin::start(&url, "");
    let mock = Mock::start(&[]);
    let body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        &[],
    ) + &control_plane(&url, &[]);
    let gw = Gateway::start(&body, &[]);

    let mut tokens = Vec::new();
    for w in 0..3 {
        tokens.push(admin.sign_up(&format!("writer{w}@failover.test")).await);
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(w, t)| {
            tokio::spawn(writer(
                admin.base.clone(),
                t.clone(),
                w,
                log.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_crash = log.lock().unwrap().outcomes.len();

    // The crash, a detection delay, the promotion, the address moved.
    pair.primary.crash();
    let crashed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = pg("pg_ctl");
    c.arg("-D")
        .arg(&pair.standby.dir)
        .args(["-w", "-t", "60", "promote"])
        .stdout(Stdio::null());
    run(c, "pg_ctl promote");
    vip.set_target(format!("127.0.0.1:{}", pair.standby.port).parse().unwrap());
    vip.cut();
    let switched = crashed.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let log = Arc::try_unwrap(log).ok().unwrap().into_inner().unwrap();
    let after: Vec<&Outcome> = log.outcomes.iter().filter(|o| o.at >= crashed).collect();
    let ok = |o: &&Outcome| (200..300).contains(&o.status);
    let failed: Vec<&Outcome> = log.outcomes.iter().filter(|o| !ok(o)).collect();
    let first_ok_after = after
        .iter()
        .filter(|o| ok(o))
        .map(|o| o.at + o.took - crashed)
        .min()
        .expect("no write succeeded after the failover: the admin did not recover");
    let slowest = log.outcomes.iter().map(|o| o.took).max().unwrap();
    let mut by_status = std::collections::BTreeMap::new();
    for o in &failed {
        let code = o.body["error"]["code"].as_str().unwrap_or("-").to_owned();
        *by_status.entry((o.status, code)).or_insert(0) += 1;
    }
    // What the admin logged for them (one line per distinct message).
    let mut seen = std::collections::BTreeSet::new();
    for l in admin_log(&admin).lines().filter(|l| l.contains("ERROR")) {
        let msg = l.split_once("ERROR").map_or(l, |(_, m)| m);
        let msg: String = msg
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(220)
            .collect();
        if seen.insert(msg.clone()) && seen.len() <= 12 {
            println!("admin error: {msg}");
        }
    }
    println!(
        "failover: {} writes before the crash, {} from the crash on ({} ok); failed {} \
         (by status {by_status:?}); address switched {:.2} s after the crash; first success \
         {:.2} s after the crash; slowest call {:.2} s; {} keys acknowledged, {} revocations",
        before_crash,
        after.len(),
        after.iter().filter(|o| ok(o)).count(),
        failed.len(),
        switched.as_secs_f64(),
        first_ok_after.as_secs_f64(),
        slowest.as_secs_f64(),
        log.keys.len(),
        log.revoked.len()
    );
    // Clean errors: 503 `unavailable` (worth a retry) in the error shape, nothing hanging
    // (pool acquire timeout 5 s).
    for o in &failed {
        assert!(
            o.status == 503 && o.body["error"]["code"] == "unavailable",
            "not a 503 during the gap: {o:?}"
        );
        let e = &o.body["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string() && e["code"].is_string(),
            "error shape: {o:?}"
        );
    }
    assert!(
        !failed.is_empty(),
        "the crash should have failed some writes"
    );
    assert!(slowest < Duration::from_secs(8), "a call hung: {slowest:?}");

    // Every acknowledged write is on the new primary; nothing is half-applied.
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pair.standby.url())
        .await
        .unwrap();
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT k.id, k.name, k.deleted_at FROM api_keys k JOIN developers d \
         ON d.id = k.developer_id WHERE d.email LIKE '%@failover.test'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.event_type, o.payload FROM outbox o JOIN developers d \
         ON d.id = o.developer_id WHERE d.email LIKE '%@failover.test'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let has_event = |kind: &str, id: &str| {
        events
            .iter()
            .filter(|(t, p)| t == kind && p.contains(id))
            .count()
    };
    let stored: std::collections::HashMap<&str, (&str, Option<i64>)> = rows
        .iter()
        .map(|(id, name, del)| (id.as_str(), (name.as_str(), *del)))
        .collect();
    for (id, (_, _, acked, attempted)) in &log.keys {
        let (name, _) = stored
            .get(id.as_str())
            .unwrap_or_else(|| panic!("acknowledged key {id} lost in the failover"));
        if *acked > 0 {
            let n: i64 = name.rsplit('-').next().unwrap().parse().unwrap_or(0);
            assert!(
                (*acked..=*attempted).contains(&n),
                "key {id}: name {name}, acknowledged rename {acked}, last attempted {attempted}"
            );
        }
    }
    for id in &log.revoked {
        assert!(
            stored[id.as_str()].1.is_some(),
            "acknowledged revocation of {id} lost"
        );
    }
    for (id, (_, deleted)) in &stored {
        assert_eq!(
            has_event(aihub_store::outbox::API_KEY_CREATED, id),
            1,
            "key {id} and its created event"
        );
        assert_eq!(
            has_event(aihub_store::outbox::API_KEY_DELETED, id),
            usize::from(deleted.is_some()),
            "key {id}: revoked {deleted:?} and its deleted event"
        );
    }
    assert_eq!(
        events
            .iter()
            .filter(|(t, _)| t == aihub_store::outbox::API_KEY_CREATED)
            .count(),
        stored.len(),
        "created events without their key"
    );

    // The gateway follows the new primary: a key created after the failover serves, a key
    // revoked after it is refused, an acknowledged key from before serves.
    let (fresh, _) = admin
        .create_key(&tokens[0], json!({"name": "after-failover"}))
        .await;
    let limit = Duration::from_secs(10);
    let served = until(&gw, &fresh, 200, limit).await;
    let (old_id, (old_key, old_writer, _, _)) = log
        .keys
        .iter()
        .find(|(id, _)| stored[id.as_str()].1.is_none())
        .unwrap();
    until(&gw, old_key, 200, limit).await;
    let (s, _) = admin
        .call(
            "DELETE",
            &format!("/developer/keys/{old_id}"),
            Some(&tokens[*old_writer]),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let refused = until(&gw, old_key, 401, limit).await;
    println!(
        "gateway after the failover: new key served after {:.2} s, revocation applied after \
         {:.2} s",
        served.as_secs_f64(),
        refused.as_secs_f64()
    );
    assert!(
        !admin_log(&admin).contains("panicked") && !gw.log_text().contains("panicked"),
        "a panic in a log"
    );
}

fn admin_log(admin: &Admin) -> String {
    std::fs::read_to_string(&admin.log).unwrap_or_default()
}

/// Polls `GET /v1/models` until it answers `status`; how long that took (panics after `limit`).
async fn until(gw: &Gateway, key: &str, status: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if gw.get(key, "/v1/models").await.status().as_u16() == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "the gateway never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` holds key `id`.
fn wait_replicated(node: &Node, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.sql(&format!("SELECT count(*) FROM api_keys WHERE id = '{id}'")) != "1" {
        assert!(Instant::now() < deadline, "{id} never reached the standby");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_loses_commits_takes_them_back_from_the_gateway() {
    let _serial = SERIAL.lock().await;
    let port = free_port();
    // The standby streams through a link the test can stall.
    let link = FaultProxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let pair = Pair::start(port, false, Some(link.addr.port()));
    let vip = FaultProxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let url = format!("postgres://postgres@{}/postgres", vip.addr);
    let admin = Admin::start(&url, "");
    let mock = Mock::start(&[]);
    let body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        &[],
    ) + &control_plane(&url, &[]);
    let gw = Gateway::start(&body, &[]);
    let limit = Duration::from_secs(10);

    let token = admin.sign_up("lossy@failover.test").await;
    let (a, a_id) = admin.create_key(&token, json!({"name": "a"})).await;
    wait_replicated(&pair.standby, &a_id);
    until(&gw, &a, 200, limit).await;

    // The link stalls: B's creation and A's revocation commit on the primary only (the
    // gateway reads both there), then the primary dies and the standby takes over without them.
    link.hold(true);
    let (b, b_id) = admin.create_key(&token, json!({"name": "b"})).await;
    let (s, _) = admin
        .call(
            "DELETE",
            &format!("/developer/keys/{a_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(s, 204);
    until(&gw, &b, 200, limit).await;
    until(&gw, &a, 401, limit).await;
    pair.primary.crash();
    link.cut();
    let mut c = pg("pg_ctl");
    c.arg("-D")
        .arg(&pair.standby.dir)
        .args(["-w", "-t", "60", "promote"])
        .stdout(Stdio::null());
    run(c, "pg_ctl promote");
    vip.set_target(format!("127.0.0.1:{}", pair.standby.port).parse().unwrap());
    vip.cut();
    assert_eq!(
        pair.standby.sql(&format!(
            "SELECT count(*) FROM api_keys WHERE id = '{b_id}'"
        )),
        "0",
        "B should be lost with the old primary"
    );

    // The gateway converges on the new primary: B (lost) refused, A (its revocation lost)
    // served, a key created now served.
    let dropped = until(&gw, &b, 401, limit).await;
    let back = until(&gw, &a, 200, limit).await;
    let (c_key, _) = admin.create_key(&token, json!({"name": "c"})).await;
    let served = until(&gw, &c_key, 200, limit).await;
    println!(
        "lossy failover: the key lost refused after {:.2} s, the key whose revocation was lost \
         served again after {:.2} s, a new key served after {:.2} s",
        dropped.as_secs_f64(),
        back.as_secs_f64(),
        served.as_secs_f64()
    );
    assert!(gw
        .log_text()
        .contains("the key feed went back behind what this gateway read"));
}
