//! Black-box tests of the control-plane key sync: the real gateway binary following a real
//! SQLite file and a real PostgreSQL database (a fresh one per test), with keys written through
//! `aihub-store` as the admin API writes them. Changes must reach the gateway within 1 s; known
//! keys keep serving through database outages; `/readyz` waits for the initial load; Redis
//! notices wake the sync at once; last-used times are written back.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aihub_store::developers::{self, OperatorUpdate};
use aihub_store::feed;
use aihub_store::keys::{self, KeyUpdate};
use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
use aihub_store::Store;
use common::*;

/// The change-propagation bound the issue sets.
const WITHIN: Duration = Duration::from_secs(1);

async fn developer(store: &Store) -> developers::Developer {
    let email = format!("{}@example.com", aihub_store::new_id("dev"));
    aihub_store::testing::developer(store, &email).await
}

async fn update_key(store: &Store, id: &str, u: KeyUpdate) {
    let mut tx = store.begin_write().await.unwrap();
    keys::update(&mut tx, None, id, &u).await.unwrap();
    tx.commit().await.unwrap();
}

async fn revoke_key(store: &Store, id: &str) {
    let mut tx = store.begin_write().await.unwrap();
    keys::revoke(&mut tx, None, id).await.unwrap();
    tx.commit().await.unwrap();
}

async fn set_developer_active(store: &Store, id: &str, active: bool) {
    let mut tx = store.begin_write().await.unwrap();
    let u = OperatorUpdate {
        active: Some(active),
        ..Default::default()
    };
    developers::operator_update(&mut tx, id, &u).await.unwrap();
    tx.commit().await.unwrap();
}

async fn models_status(gw: &Gateway, key: &str) -> u16 {
    gw.get(key, "/v1/models").await.status().as_u16()
}

/// Polls `GET /v1/models` with `key` until it answers `want`; returns how long that took.
/// Panics after `limit`.
async fn until_status(gw: &Gateway, key: &str, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = models_status(gw, key).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "still {got} (want {want}) after {limit:?}:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the change made just before reaches the gateway within [`WITHIN`].
async fn takes_effect(gw: &Gateway, key: &str, want: u16, what: &str) {
    let took = until_status(gw, key, want, Duration::from_secs(10)).await;
    assert!(took < WITHIN, "{what}: took {took:?}");
}

async fn metric_until(gw: &Gateway, series: &str, want: f64, limit: Duration) {
    let start = Instant::now();
    while gw.metric(series) != want {
        assert!(
            start.elapsed() < limit,
            "{series} != {want}:\n{}",
            gw.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `needle` appears `n` times in the log (lines are written every 50 ms), then
/// checks it stays at `n`.
async fn log_count_until(gw: &Gateway, needle: &str, n: usize) {
    let start = Instant::now();
    loop {
        let log = gw.log_text();
        let count = log.matches(needle).count();
        assert!(count <= n, "{needle:?} logged {count} times:\n{log}");
        if count == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{needle:?} logged {count} times:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn body_with(mock: &Mock, yaml_keys: &[&TestKey], control: &str) -> String {
    let up = [upstream("m", &[mock.base_url()], &[])];
    format!(
        "{}{control}",
        config(&up, &[("mock-gpt", "m", None)], yaml_keys)
    )
}

async fn lifecycle(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (early, early_id) = create_key(&store, &dev.id, &[]).await;
    let mock = Mock::start(&[]);
    let yaml = key("yaml1", &[]);
    let gw = Gateway::start(
        &body_with(&mock, &[&yaml], &control_plane(&db.url, &[])),
        &[],
    );

    // Loaded at start, beside the declarative key; proxying works with a synced key.
    assert_eq!(models_status(&gw, &early).await, 200);
    assert_eq!(models_status(&gw, &yaml.key).await, 200);
    let resp = gw.chat(&early, &chat("mock-gpt")).await;
    assert_eq!(resp.status(), 200, "{backend:?}");

    // Created after start.
    let (later, later_id) = create_key(&store, &dev.id, &[]).await;
    takes_effect(&gw, &later, 200, "create").await;

    // Expiry moved into the past, then removed.
    let past = aihub_store::now_ms() - 1_000;
    update_key(
        &store,
        &later_id,
        KeyUpdate {
            expires_at: Some(Some(past)),
            ..Default::default()
        },
    )
    .await;
    takes_effect(&gw, &later, 401, "expiry").await;
    expect_error(gw.get(&later, "/v1/models").await, 401, "api_key_expired").await;
    update_key(
        &store,
        &later_id,
        KeyUpdate {
            expires_at: Some(None),
            ..Default::default()
        },
    )
    .await;
    takes_effect(&gw, &later, 200, "expiry removed").await;

    // Revocation.
    revoke_key(&store, &early_id).await;
    takes_effect(&gw, &early, 401, "revoke").await;
    expect_error(gw.get(&early, "/v1/models").await, 401, "invalid_api_key").await;

    // Developer disabled, then enabled again.
    set_developer_active(&store, &dev.id, false).await;
    takes_effect(&gw, &later, 401, "developer disabled").await;
    expect_error(gw.get(&later, "/v1/models").await, 401, "api_key_disabled").await;
    set_developer_active(&store, &dev.id, true).await;
    takes_effect(&gw, &later, 200, "developer enabled").await;

    // SIGHUP replaces the declarative keys only: synced keys stay.
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let yaml2 = key("yaml2", &[]);
    write(&gw.config_path(), &text.replace(&yaml.yaml, &yaml2.yaml));
    let reloads = gw.metric("aihub_config_reloads_total{result=\"ok\"}");
    gw.reload();
    assert_eq!(
        gw.metric_eventually("aihub_config_reloads_total{result=\"ok\"}", reloads + 1.0),
        reloads + 1.0
    );
    assert_eq!(models_status(&gw, &yaml2.key).await, 200);
    assert_eq!(models_status(&gw, &yaml.key).await, 401);
    assert_eq!(
        models_status(&gw, &later).await,
        200,
        "synced key dropped by reload"
    );

    assert_eq!(gw.metric("aihub_key_sync_up"), 1.0);
    assert_eq!(gw.metric("aihub_key_sync_keys"), 1.0);
    assert_eq!(gw.metric("aihub_keys_loaded"), 2.0);
    assert!(gw.metric("aihub_key_sync_changes_total") >= 7.0);
    assert!(gw.metric("aihub_key_sync_last_success_timestamp_seconds") > 1.0e9);
    assert!(gw.metric("aihub_key_sync_initial_load_seconds") > 0.0);
    assert_eq!(gw.metric("aihub_key_sync_errors_total"), 0.0);
    let log = gw.log_text();
    assert!(log.contains("control-plane keys loaded"), "{log}");
    // The database URL is a credential: never logged.
    assert!(!log.contains(&db.url), "{log}");
}

#[tokio::test]
async fn changes_reach_the_gateway_within_a_second() {
    for backend in BACKENDS {
        lifecycle(backend).await;
    }
}

async fn ip_allowlists(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (local, _) = create_key(&store, &dev.id, &["127.0.0.1"]).await;
    let (private, _) = create_key(&store, &dev.id, &["10.0.0.0/8"]).await;
    let (mixed, _) = create_key(&store, &dev.id, &["10.0.0.0/8", "127.0.0.0/8", "::1"]).await;
    let mock = Mock::start(&[]);
    let yaml_private = key("yp", &["ip_allowlist: [\"10.0.0.0/8\"]"]);
    let yaml_local = key("yl", &["ip_allowlist: [\"127.0.0.1/32\"]"]);
    let gw = Gateway::start(
        &body_with(
            &mock,
            &[&yaml_private, &yaml_local],
            &control_plane(&db.url, &[]),
        ),
        &[],
    );
    assert_eq!(models_status(&gw, &local).await, 200);
    assert_eq!(models_status(&gw, &mixed).await, 200);
    assert_eq!(gw.chat(&local, &chat("mock-gpt")).await.status(), 200);
    assert_eq!(models_status(&gw, &yaml_local.key).await, 200);
    let e = expect_error(
        gw.chat(&private, &chat("mock-gpt")).await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert_eq!(e["type"], "invalid_request_error");
    expect_error(gw.get(&private, "/v1/models").await, 403, "ip_not_allowed").await;
    expect_error(
        gw.get(&yaml_private.key, "/v1/models").await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert_eq!(
        gw.metric_eventually("aihub_auth_failures_total{reason=\"forbidden_ip\"}", 3.0),
        3.0
    );
}

#[tokio::test]
async fn ip_allowlists_are_enforced() {
    for backend in BACKENDS {
        ip_allowlists(backend).await;
    }
}

/// A TCP forwarder to PostgreSQL that the test can cut (closing every forwarded connection
/// and the listener) and restore on the same port.
struct Forwarder {
    port: u16,
    target: std::net::SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    fn new(target: &str) -> Forwarder {
        use std::net::ToSocketAddrs;
        Forwarder {
            port: free_port(),
            target: target.to_socket_addrs().unwrap().next().unwrap(),
            tasks: Default::default(),
        }
    }

    async fn start(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (target, tasks) = (self.target, Arc::clone(&self.tasks));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Closes the listener and every forwarded connection.
    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the database unusable for the gateway and usable again: PostgreSQL through a cut
/// TCP forwarder (a real outage), SQLite by renaming a table the feed reads (a file cannot be
/// taken away from an open connection; keys can still be written meanwhile, the renamed
/// table's foreign keys follow it).
struct Outage {
    forwarder: Option<Forwarder>,
    store: Store,
}

impl Outage {
    async fn begin(&self) {
        match &self.forwarder {
            Some(f) => f.stop(),
            None => {
                sqlx_exec(
                    &self.store,
                    "ALTER TABLE developers RENAME TO developers_away",
                )
                .await
            }
        }
    }

    async fn end(&self) {
        match &self.forwarder {
            Some(f) => f.start().await,
            None => {
                sqlx_exec(
                    &self.store,
                    "ALTER TABLE developers_away RENAME TO developers",
                )
                .await
            }
        }
    }
}

async fn sqlx_exec(store: &Store, sql: &str) {
    use sqlx::Executor;
    store.pool().execute(sql).await.unwrap();
}

async fn outages(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    // The gateway's view of the database: through the forwarder for PostgreSQL.
    let (forwarder, gateway_url) = match backend {
        Backend::Postgres => {
            // postgres://user@HOST:PORT/db → postgres://user@127.0.0.1:FORWARDER/db
            let (head, rest) = db.url.split_once("://").unwrap();
            let (authority, path) = rest.split_once('/').unwrap();
            let (user, host) = authority.rsplit_once('@').unwrap_or(("", authority));
            let target = if host.contains(':') {
                host.to_owned()
            } else {
                format!("{host}:5432")
            };
            let f = Forwarder::new(&target);
            let at = if user.is_empty() { "" } else { "@" };
            let url = format!("{head}://{user}{at}127.0.0.1:{}/{path}", f.port);
            f.start().await;
            (Some(f), url)
        }
        Backend::Sqlite => (None, db.url.clone()),
    };
    let mock = Mock::start(&[]);
    let yaml = key("yaml1", &[]);
    // Not migrated yet: the gateway serves, is not ready, and the declarative key works.
    let gw = Gateway::start_live(
        &body_with(&mock, &[&yaml], &control_plane(&gateway_url, &[])),
        &[],
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body) = http_get(gw.ops, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("control-plane keys"), "{body}");
    assert_eq!(http_get(gw.ops, "/healthz").0, 200);
    assert_eq!(models_status(&gw, &yaml.key).await, 200);
    assert_eq!(gw.metric("aihub_key_sync_up"), 0.0);

    // Migrated (as the admin API would) with a key: ready, and the key works.
    let store = db.store().await;
    let dev = developer(&store).await;
    let (known, known_id) = create_key(&store, &dev.id, &[]).await;
    let start = Instant::now();
    while http_get(gw.ops, "/readyz").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first load may have run between the migration and the key's insert: then the key
    // arrives through the feed, within the usual second.
    until_status(&gw, &known, 200, WITHIN).await;
    assert_eq!(gw.metric("aihub_key_sync_up"), 1.0);

    // Outage: known keys keep working, the sync reports down, one log line.
    let outage = Outage {
        forwarder,
        store: store.clone(),
    };
    outage.begin().await;
    metric_until(&gw, "aihub_key_sync_up", 0.0, Duration::from_secs(10)).await;
    revoke_key(&store, &known_id).await;
    let (created_during, _) = create_key(&store, &dev.id, &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        models_status(&gw, &known).await,
        200,
        "known key refused during outage"
    );
    assert_eq!(models_status(&gw, &yaml.key).await, 200);
    assert!(gw.metric("aihub_key_sync_errors_total") >= 2.0);
    let down = "control-plane database unreachable or not migrated";
    // Once at start (not migrated), once for this outage; not once per failed read.
    log_count_until(&gw, down, 2).await;

    // Recovery: the changes made meanwhile apply.
    outage.end().await;
    until_status(&gw, &known, 401, Duration::from_secs(15)).await;
    until_status(&gw, &created_during, 200, Duration::from_secs(5)).await;
    metric_until(&gw, "aihub_key_sync_up", 1.0, Duration::from_secs(5)).await;
    log_count_until(&gw, "reachable again", 2).await;
    drop(gw);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_keys_and_outages_keep_known_keys() {
    for backend in BACKENDS {
        outages(backend).await;
    }
}

/// Redis for tests: `AIHUB_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
fn redis_url() -> String {
    std::env::var("AIHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn push(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (k, k_id) = create_key(&store, &dev.id, &[]).await;
    let mock = Mock::start(&[]);
    let gw = Gateway::start(
        &body_with(
            &mock,
            &[],
            &control_plane(
                &db.url,
                &[
                    &format!("redis_url: \"{}\"", redis_url()),
                    "push_poll_interval: 30s",
                ],
            ),
        ),
        &[],
    );
    metric_until(
        &gw,
        "aihub_key_sync_push_connected",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    // Let the follower take the subscription into account (its catch-up read).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(models_status(&gw, &k).await, 200);

    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();

    // Without a notice, a revocation waits for the 30 s safety-net poll.
    revoke_key(&store, &k_id).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        models_status(&gw, &k).await,
        200,
        "applied without a notice?"
    );
    // The admin API's notice: PUBLISH aihub:keys:changed <head>.
    let head = feed::head(&store).await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(feed::REDIS_CHANNEL)
        .arg(head)
        .query_async(&mut conn)
        .await
        .unwrap();
    takes_effect(&gw, &k, 401, "revoke pushed through Redis").await;

    let (k2, _) = create_key(&store, &dev.id, &[]).await;
    let head = feed::head(&store).await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(feed::REDIS_CHANNEL)
        .arg(head)
        .query_async(&mut conn)
        .await
        .unwrap();
    takes_effect(&gw, &k2, 200, "create pushed through Redis").await;
}

#[tokio::test]
async fn redis_notices_apply_changes_at_once() {
    for backend in BACKENDS {
        push(backend).await;
    }
}

async fn last_used(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (used, used_id) = create_key(&store, &dev.id, &[]).await;
    let (_idle, idle_id) = create_key(&store, &dev.id, &[]).await;
    let mock = Mock::start(&[]);
    let gw = Gateway::start(
        &body_with(
            &mock,
            &[],
            &control_plane(&db.url, &["last_used_flush_interval: 200ms"]),
        ),
        &[],
    );
    let before = aihub_store::now_ms();
    assert_eq!(gw.chat(&used, &chat("mock-gpt")).await.status(), 200);
    let start = Instant::now();
    let at = loop {
        if let Some(at) = keys::get(&store, None, &used_id)
            .await
            .unwrap()
            .last_used_at
        {
            break at;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        at >= before && at <= aihub_store::now_ms(),
        "{at} vs {before}"
    );
    let idle = keys::get(&store, None, &idle_id).await.unwrap();
    assert_eq!(idle.last_used_at, None);
    assert!(gw.metric("aihub_key_last_used_flushes_total{result=\"ok\"}") >= 1.0);
}

#[tokio::test]
async fn last_used_times_are_written_back() {
    for backend in BACKENDS {
        last_used(backend).await;
    }
}

/// A gateway that starts while the control-plane database is unreachable serves the keys of
/// its local snapshot (written by an earlier run) instead of staying not-ready.
#[tokio::test]
async fn a_gateway_started_without_its_database_serves_the_snapshot() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (key, _) = create_key(&store, &dev.id, &["127.0.0.1"]).await;
    let (revoked, revoked_id) = create_key(&store, &dev.id, &[]).await;
    revoke_key(&store, &revoked_id).await;
    let mock = Mock::start(&[]);
    let snap_dir = tempfile::tempdir().unwrap();
    let snapshot = snap_dir.path().join("keys.jsonl");
    let snapshot_line = format!("snapshot_path: \"{}\"", snapshot.display());

    let first = Gateway::start(
        &body_with(&mock, &[], &control_plane(&db.url, &[&snapshot_line])),
        &[],
    );
    assert_eq!(models_status(&first, &key).await, 200);
    for _ in 0..100 {
        if snapshot.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(snapshot.exists(), "no snapshot written");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    assert!(!text.contains(&key), "the snapshot holds a key");
    drop(first);

    // The "database" now has no tables at all: unreachable as far as the gateway can tell.
    let empty = tempfile::tempdir().unwrap();
    let nowhere = format!("sqlite://{}/empty.db", empty.path().display());
    let second = Gateway::start(
        &body_with(&mock, &[], &control_plane(&nowhere, &[&snapshot_line])),
        &[],
    );
    assert_eq!(models_status(&second, &key).await, 200);
    assert_eq!(second.chat(&key, &chat("mock-gpt")).await.status(), 200);
    assert_eq!(models_status(&second, &revoked).await, 401);
    second.wait_for_log("serving the keys of the local snapshot");
}

/// Committed transactions of database `name`, as PostgreSQL counts them (read from another
/// database so the reading itself is not counted; backends report at most once a second).
async fn transactions_of(admin: &Store, name: &str) -> i64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_one(admin.pool())
    .await
    .unwrap()
}

/// A flood of well-formed but unknown keys is answered from memory: the control-plane database
/// sees no query at all.
#[tokio::test]
async fn unknown_keys_cost_the_database_nothing() {
    let db = TestDatabase::new(Backend::Postgres).await;
    let store = db.store().await;
    let dev = developer(&store).await;
    let (known, _) = create_key(&store, &dev.id, &[]).await;
    store.close().await;
    let mock = Mock::start(&[]);
    let gw = Gateway::start(
        &body_with(
            &mock,
            &[],
            &control_plane(
                &db.url,
                &["poll_interval: 60s", "last_used_flush_interval: 60s"],
            ),
        ),
        &[],
    );
    assert_eq!(models_status(&gw, &known).await, 200);
    let admin_url = std::env::var("AIHUB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = Store::connect(&aihub_store::StoreOptions::new(&admin_url))
        .await
        .unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let before = transactions_of(&admin, &name).await;
    for _ in 0..300 {
        let stranger = aihub_apikey::generate();
        assert_eq!(models_status(&gw, &stranger).await, 401);
    }
    let after = transactions_of(&admin, &name).await;
    assert_eq!(after, before, "unknown keys caused database transactions");
    admin.close().await;
}
