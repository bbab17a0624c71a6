//! The usage schema on a real ClickHouse cluster: ZooKeeper and two replicas of one shard,
//! started by `deploy/clickhouse/cluster.sh` on free ports in a temporary directory, once for
//! this test binary (a watcher the script leaves behind stops it and deletes the directory
//! when the binary exits). Each test works in a database of its own. Tests that stop a replica
//! take the cluster for themselves; the others share it.
//!
//! `AIHUB_TEST_CLUSTER=0` skips them (each says so); otherwise a cluster that cannot start
//! fails them (`cluster.sh` installs ZooKeeper with apt-get when it is missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aihub_usage::read::{billing, daily, events, platform, totals, Days, MS_PER_DAY, MS_PER_HOUR};
use aihub_usage::schema::{self, MIGRATIONS};
use aihub_usage::sink::{self, ClickHouseConfig, InsertError};
use aihub_usage::testing::usage_row;
use aihub_usage::UsageRecord;
use tokio::sync::RwLock;

const CLUSTER: &str = "aihub";
/// 2026-03-01T00:00:00Z.
const MARCH: i64 = 1_772_323_200_000;
const APRIL: i64 = MARCH + 31 * MS_PER_DAY;

/// Shared by the tests that keep both replicas up; taken alone by those that stop one.
static REPLICAS_UP: RwLock<()> = RwLock::const_new(());
static RUNNING: OnceLock<Option<Cluster>> = OnceLock::new();

/// The running cluster: ports and data directories.
struct Cluster {
    dir: PathBuf,
    /// (http, tcp) of replica 1 and 2.
    replicas: [(u16, u16); 2],
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/clickhouse")
        .join(name)
}

/// A port free now (and, with `plus_nine`, its interserver port TCP + 9 as well).
fn free_port(taken: &mut Vec<u16>, plus_nine: bool) -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let ok = port < 65_000
            && !taken.contains(&port)
            && (!plus_nine || (!taken.contains(&(port + 9)) && free(port + 9)));
        if ok {
            taken.push(port);
            if plus_nine {
                taken.push(port + 9);
            }
            return port;
        }
    }
}

impl Cluster {
    /// The cluster of this test binary, started on first use; `None` when skipped.
    fn get() -> Option<&'static Cluster> {
        RUNNING.get_or_init(Cluster::start).as_ref()
    }

    fn start() -> Option<Cluster> {
        if std::env::var("AIHUB_TEST_CLUSTER").as_deref() == Ok("0") {
            return None;
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("aihub-cluster-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let mut taken = Vec::new();
        let zk = free_port(&mut taken, false);
        let http1 = free_port(&mut taken, false);
        let tcp1 = free_port(&mut taken, true);
        let http2 = free_port(&mut taken, false);
        let tcp2 = free_port(&mut taken, true);
        let out = Command::new(script("cluster.sh"))
            .arg("start")
            .arg(&dir)
            .args([zk, http1, tcp1, http2, tcp2].map(|p| p.to_string()))
            .env("CLUSTER_NAME", CLUSTER)
            .env("CLUSTER_WATCH_PID", std::process::id().to_string())
            .env("CLUSTER_WATCH_REMOVE", "1")
            .output()
            .expect("run deploy/clickhouse/cluster.sh");
        assert!(
            out.status.success(),
            "deploy/clickhouse/cluster.sh start failed (AIHUB_TEST_CLUSTER=0 skips these tests):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "cluster up in {:.1}s under {}",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Some(Cluster {
            dir,
            replicas: [(http1, tcp1), (http2, tcp2)],
        })
    }

    /// Settings for `database` through replica `i` (0 or 1).
    fn config(&self, i: usize, database: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: format!("http://127.0.0.1:{}", self.replicas[i].0),
            database: database.into(),
            cluster: Some(CLUSTER.into()),
            ..ClickHouseConfig::default()
        }
    }

    fn replica_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("r{}", i + 1))
    }

    fn stop_replica(&self, i: usize) {
        run(Command::new(script("stop.sh")).arg(self.replica_dir(i)));
    }

    fn start_replica(&self, i: usize) {
        let (http, tcp) = self.replicas[i];
        run(Command::new(script("start.sh"))
            .arg(self.replica_dir(i))
            .args([http.to_string(), tcp.to_string()]));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn run(command: &mut Command) {
    let out = command.output().expect("run a script");
    assert!(
        out.status.success(),
        "{command:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster, or `None` after saying the test is skipped.
fn cluster(test: &str) -> Option<&'static Cluster> {
    let c = Cluster::get();
    if c.is_none() {
        eprintln!("{test}: skipped (AIHUB_TEST_CLUSTER=0)");
    }
    c
}

/// A fresh database, migrated through replica 1.
async fn fresh(c: &Cluster) -> String {
    let database = format!("aihub_c_{}", uuid::Uuid::now_v7().simple());
    let report = schema::migrate(&c.config(0, &database))
        .await
        .expect("migrations on the cluster");
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(report.applied, all);
    database
}

async fn count(config: &ClickHouseConfig, sql: &str) -> u64 {
    config
        .client()
        .query(sql)
        .fetch_one()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits (30 s at most) until `sql` gives `want` on `config`'s replica.
async fn eventually(config: &ClickHouseConfig, sql: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = count(config, sql).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} on {}: {got}, want {want}",
            config.url
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `config`'s replica has fetched every part it knows of (nothing left in its
/// replication queues), so counts read afterwards are final.
async fn settled(config: &ClickHouseConfig) {
    eventually(
        config,
        "SELECT toUInt64(sum(queue_size)) FROM system.replicas WHERE database = currentDatabase()",
        0,
    )
    .await;
}

async fn insert(config: &ClickHouseConfig, rows: &[UsageRecord]) -> Result<(), InsertError> {
    sink::insert(&config.client(), Duration::from_secs(30), rows).await
}

/// `n` rows spread over March's days and hours, from `developers` and two models; every 50th
/// has no tokens (a refusal, status 429).
fn rows(n: usize, developers: &[&str]) -> Vec<UsageRecord> {
    (0..n)
        .map(|i| {
            let developer = developers[i % developers.len()];
            let model = if i % 3 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
            let at =
                MARCH + (i as i64 % 28) * MS_PER_DAY + (i as i64 % 24) * MS_PER_HOUR + i as i64;
            usage_row(
                developer,
                at,
                model,
                (i % 50) as u32 * 10,
                (i as i64 % 7) * 1_000,
            )
        })
        .collect()
}

/// What every table says about March, through `config`'s replica: raw rows, the hourly
/// rollup, the daily rollup and the platform rollup must agree with the rows.
async fn assert_march(config: &ClickHouseConfig, expected: &[UsageRecord], developers: &[&str]) {
    let client = config.client();
    let march = Days {
        first: MARCH / MS_PER_DAY,
        last: APRIL / MS_PER_DAY - 1,
    };
    assert_eq!(
        totals::raw_count(&client, MARCH, APRIL).await.unwrap(),
        expected.len() as u64,
        "raw rows on {}",
        config.url
    );
    let window = totals::window(&client, MARCH, APRIL, None).await.unwrap();
    assert_eq!(
        window,
        totals::hourly_rollup(&client, MARCH, APRIL, None)
            .await
            .unwrap()
    );
    for developer in developers {
        let mine: Vec<&UsageRecord> = expected
            .iter()
            .filter(|r| r.developer_id == *developer)
            .collect();
        let tokens: u64 = mine.iter().map(|r| u64::from(r.total_tokens)).sum();
        let nanos: i64 = mine.iter().map(|r| r.cost_nanos).sum();
        let w = window
            .iter()
            .find(|w| w.developer_id == *developer)
            .unwrap();
        assert_eq!(
            (w.requests, w.tokens, w.cost_nanos),
            (mine.len() as u64, tokens, nanos),
            "{developer} on {}",
            config.url
        );
        let report = daily::report(&client, developer, None, march)
            .await
            .unwrap();
        let total = report.iter().find(|r| r.dim == "total").unwrap();
        assert_eq!(
            (total.n, total.tokens, total.nanos),
            (mine.len() as u64, tokens, nanos),
            "daily rollup of {developer} on {}",
            config.url
        );
        let errors = mine.iter().filter(|r| r.status >= 400).count() as u64;
        assert_eq!(total.errors, errors);
        assert_every_query(
            &client,
            developer,
            march,
            (mine.len() as u64, tokens, nanos),
        )
        .await;
    }
    let (devs, models) = platform::overview(&client, march, 10).await.unwrap();
    assert_eq!(devs.requests, expected.len() as u64);
    assert_eq!(
        devs.nanos,
        expected.iter().map(|r| r.cost_nanos).sum::<i64>()
    );
    assert_eq!(
        models.iter().map(|m| m.n).sum::<u64>(),
        expected.len() as u64
    );
}

/// The other questions `aihub_usage::read` answers, through the `Distributed` tables: each
/// gives the developer's `(requests, tokens, nanos)` over March, or its part of them.
async fn assert_every_query(
    client: &clickhouse::Client,
    developer: &str,
    march: Days,
    (n, tokens, nanos): (u64, u64, i64),
) {
    let compared = daily::compare(client, developer, march, march)
        .await
        .unwrap();
    assert!(
        compared.iter().any(|r| r.n == n && r.nanos == nanos),
        "{developer}"
    );
    let costs = daily::costs(client, developer, march).await.unwrap();
    let by_model: Vec<_> = costs.iter().filter(|c| c.dim == "model").collect();
    assert_eq!(by_model.iter().map(|c| c.n).sum::<u64>(), n);
    assert_eq!(by_model.iter().map(|c| c.nanos).sum::<i64>(), nanos);
    let (latencies, statuses) = daily::performance(client, developer, march).await.unwrap();
    assert!(!latencies.is_empty());
    assert_eq!(statuses.iter().map(|s| s.n).sum::<u64>(), n);
    let days = daily::daily_series(client, developer, march).await.unwrap();
    assert_eq!(days.iter().map(|b| b.n).sum::<u64>(), n);
    let hours = daily::hourly_series(client, developer, MARCH, APRIL)
        .await
        .unwrap();
    assert_eq!(hours.iter().map(|b| b.n).sum::<u64>(), n);
    assert_eq!(hours.iter().map(|b| b.nanos).sum::<i64>(), nanos);
    let by_day = daily::tokens_by_day_and_model(client, developer, march)
        .await
        .unwrap();
    assert_eq!(by_day.iter().map(|d| d.tokens).sum::<u64>(), tokens);

    let mut groups = billing::hours(client, MARCH, APRIL, Some(developer)).unwrap();
    let (mut hour_n, mut pairs) = (0, Vec::new());
    while let Some(h) = groups.next().await.unwrap() {
        hour_n += h.requests;
        pairs.push((h.developer_id.clone(), i64::from(h.hour) * 1000));
    }
    assert_eq!(hour_n, n);
    let raw = billing::raw_hours(client, &pairs).await.unwrap();
    assert_eq!(raw.iter().map(|r| r.cost_nanos).sum::<i64>(), nanos);
    let mut all = billing::all_rows(client, MARCH, APRIL, Some(developer)).unwrap();
    let mut all_n = 0;
    while all.next().await.unwrap().is_some() {
        all_n += 1;
    }
    assert_eq!(all_n, n);
    let mut export = events::export(client, developer, None, MARCH, APRIL).unwrap();
    let mut exported = 0;
    while export.next().await.unwrap().is_some() {
        exported += 1;
    }
    assert_eq!(exported, n);
    events::recent_errors(client, developer, MARCH, 5)
        .await
        .unwrap();
}

/// Engines of the database's tables on one replica, by name.
async fn engines(config: &ClickHouseConfig) -> Vec<(String, String)> {
    config
        .client()
        .query(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase() \
             ORDER BY name",
        )
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_run_on_every_replica_and_again() {
    let Some(c) = cluster("migrations_run_on_every_replica_and_again") else {
        return;
    };
    let _up = REPLICAS_UP.read().await;
    let database = fresh(c).await;
    let (r1, r2) = (c.config(0, &database), c.config(1, &database));
    let tables = engines(&r1).await;
    assert_eq!(
        tables,
        engines(&r2).await,
        "the same tables on both replicas"
    );
    let engine = |name: &str| {
        tables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.as_str())
            .unwrap_or_else(|| panic!("no table {name}"))
    };
    for (name, want) in [
        ("usage_events_local", "ReplicatedMergeTree"),
        ("usage_events", "Distributed"),
        ("usage_hourly_local", "ReplicatedSummingMergeTree"),
        ("usage_hourly", "Distributed"),
        ("usage_hourly_mv", "MaterializedView"),
        ("usage_daily_live_local", "ReplicatedAggregatingMergeTree"),
        ("usage_daily_live", "Distributed"),
        (
            "usage_daily_history_local",
            "ReplicatedAggregatingMergeTree",
        ),
        ("usage_daily_history", "Distributed"),
        ("usage_daily", "Merge"),
        (
            "usage_developer_daily_live_local",
            "ReplicatedSummingMergeTree",
        ),
        ("usage_developer_daily_history", "Distributed"),
        ("usage_developer_daily", "Merge"),
        ("usage_model_daily_live_local", "ReplicatedSummingMergeTree"),
        (
            "usage_model_daily_history_local",
            "ReplicatedSummingMergeTree",
        ),
        ("usage_model_daily", "Merge"),
        ("schema_migrations", "ReplicatedMergeTree"),
    ] {
        assert_eq!(engine(name), want, "{name}");
    }
    assert!(
        !tables.iter().any(|(n, _)| n.contains("_backfill_")),
        "no staging table left: {tables:?}"
    );
    // Migrations 5 and 6 added their columns behind and in front.
    for table in ["usage_events_local", "usage_events"] {
        let n = count(
            &r2,
            &format!(
                "SELECT count() FROM system.columns WHERE database = currentDatabase() \
                 AND table = '{table}' AND name IN ('batch_id', 'attempts')"
            ),
        )
        .await;
        assert_eq!(n, 2, "{table} on replica 2");
    }
    // One history for both: once replica 2 has it, migrating through either does nothing.
    eventually(
        &r2,
        "SELECT count(DISTINCT version) FROM schema_migrations",
        MIGRATIONS.len() as u64,
    )
    .await;
    for config in [&r2, &r1] {
        assert_eq!(
            schema::migrate(config).await.unwrap().applied,
            Vec::<u32>::new()
        );
    }

    // Two servers starting at once on a new database: both succeed, one schema.
    let database = format!("aihub_c_{}", uuid::Uuid::now_v7().simple());
    let (a, b) = (c.config(0, &database), c.config(1, &database));
    let (ra, rb) = tokio::join!(schema::migrate(&a), schema::migrate(&b));
    ra.expect("migrations through replica 1");
    rb.expect("migrations through replica 2");
    let tables = engines(&a).await;
    assert_eq!(tables, engines(&b).await);
    assert_eq!(
        tables
            .iter()
            .filter(|(n, _)| n.ends_with("_history_local"))
            .count(),
        3
    );
    assert!(
        !tables.iter().any(|(n, _)| n.contains("_backfill_")),
        "{tables:?}"
    );
}

#[tokio::test]
async fn rows_inserted_on_one_replica_read_the_same_on_the_other() {
    let Some(c) = cluster("rows_inserted_on_one_replica_read_the_same_on_the_other") else {
        return;
    };
    let _up = REPLICAS_UP.read().await;
    let database = fresh(c).await;
    let (r1, r2) = (c.config(0, &database), c.config(1, &database));
    let developers = ["dev_a", "dev_b", "dev_c"];
    let batch = rows(300, &developers);
    insert(&r1, &batch[..200]).await.unwrap();
    insert(&r1, &batch[200..]).await.unwrap();
    // Outside March: not counted below.
    insert(&r1, &[usage_row("dev_a", APRIL, "gpt-4o", 10, 10)])
        .await
        .unwrap();
    // Replica 2 fetches the parts, its rollups' parts too.
    eventually(&r2, "SELECT count() FROM usage_events_local", 301).await;
    eventually(&r2, "SELECT sum(requests) FROM usage_hourly_local", 301).await;
    eventually(
        &r2,
        "SELECT countMerge(requests) FROM usage_daily_live_local",
        301,
    )
    .await;
    eventually(
        &r2,
        "SELECT sum(requests) FROM usage_model_daily_live_local",
        301,
    )
    .await;
    eventually(
        &r2,
        "SELECT sum(requests) FROM usage_developer_daily_live_local",
        301,
    )
    .await;
    settled(&r2).await;
    assert_march(&r2, &batch, &developers).await;
    assert_march(&r1, &batch, &developers).await;
}

#[tokio::test]
async fn a_replayed_batch_is_stored_once_on_either_replica() {
    let Some(c) = cluster("a_replayed_batch_is_stored_once_on_either_replica") else {
        return;
    };
    let _up = REPLICAS_UP.read().await;
    let database = fresh(c).await;
    let (r1, r2) = (c.config(0, &database), c.config(1, &database));
    let developers = ["dev_a", "dev_b"];
    let batch = rows(120, &developers);
    insert(&r1, &batch).await.unwrap();
    // The same batch again: on the replica that took it, then at once on the other one (which
    // may not have fetched it yet). Replicated block dedup drops both, in the rollups too.
    insert(&r1, &batch).await.unwrap();
    insert(&r2, &batch).await.unwrap();

    // A batch whose first attempt landed in part (its first 40 rows, a block of their own):
    // the pipeline's replay on the same replica drops what is there and inserts the rest.
    let second = rows(80, &["dev_c"]);
    insert(&r1, &second[..40]).await.unwrap();
    let mut replay = second.clone();
    assert_eq!(
        sink::drop_present(&r1.client(), &mut replay).await.unwrap(),
        40
    );
    insert(&r1, &replay).await.unwrap();
    // Replayed again after a failover to replica 2, once it has the rows: nothing left to send.
    eventually(&r2, "SELECT count() FROM usage_events_local", 200).await;
    let mut again = second.clone();
    assert_eq!(
        sink::drop_present(&r2.client(), &mut again).await.unwrap(),
        80
    );
    assert!(again.is_empty());

    let all: Vec<UsageRecord> = batch.iter().chain(&second).cloned().collect();
    let everyone = ["dev_a", "dev_b", "dev_c"];
    for config in [&r1, &r2] {
        eventually(config, "SELECT count() FROM usage_events_local", 200).await;
        settled(config).await;
        eventually(config, "SELECT sum(requests) FROM usage_hourly_local", 200).await;
        eventually(
            config,
            "SELECT countMerge(requests) FROM usage_daily_live_local",
            200,
        )
        .await;
        eventually(
            config,
            "SELECT sum(requests) FROM usage_developer_daily_live_local",
            200,
        )
        .await;
        assert_eq!(
            count(config, "SELECT uniqExact(request_id) FROM usage_events").await,
            200
        );
        assert_march(config, &all, &everyone).await;
    }
}

#[tokio::test]
async fn inserts_go_on_while_a_replica_is_down() {
    let Some(c) = cluster("inserts_go_on_while_a_replica_is_down") else {
        return;
    };
    let _alone = REPLICAS_UP.write().await;
    let database = fresh(c).await;
    let (r1, r2) = (c.config(0, &database), c.config(1, &database));
    let developers = ["dev_a", "dev_b"];
    let batch = rows(150, &developers);
    insert(&r1, &batch[..50]).await.unwrap();

    c.stop_replica(1);
    let down = async {
        // Quorum 1 (the default): the live replica takes inserts, and reads.
        insert(&r1, &batch[50..100]).await?;
        let quorum_of_one = ClickHouseConfig {
            insert_quorum: Some(1),
            ..r1.clone()
        };
        insert(&quorum_of_one, &batch[100..]).await?;
        // A gateway (re)starting meanwhile: its migrations find nothing to do and run nothing
        // `ON CLUSTER` (which would wait for the stopped replica).
        let again = tokio::time::timeout(Duration::from_secs(20), schema::migrate(&r1))
            .await
            .expect("migrations with nothing to do do not wait for the stopped replica")
            .expect("migrations with a replica down");
        assert_eq!(again.applied, Vec::<u32>::new());
        Ok::<_, InsertError>(totals::raw_count(&r1.client(), MARCH, APRIL).await.unwrap())
    }
    .await;
    c.start_replica(1);
    assert_eq!(down.expect("inserts with a replica down"), 150);

    // Back, replica 2 catches up: the same rows and rollups on both.
    for config in [&r2, &r1] {
        eventually(config, "SELECT count() FROM usage_events_local", 150).await;
        settled(config).await;
        eventually(config, "SELECT sum(requests) FROM usage_hourly_local", 150).await;
        eventually(
            config,
            "SELECT countMerge(requests) FROM usage_daily_live_local",
            150,
        )
        .await;
        eventually(
            config,
            "SELECT sum(requests) FROM usage_model_daily_live_local",
            150,
        )
        .await;
        assert_march(config, &batch, &developers).await;
    }
}

#[tokio::test]
async fn a_quorum_insert_with_a_replica_down_fails_as_transient() {
    let Some(c) = cluster("a_quorum_insert_with_a_replica_down_fails_as_transient") else {
        return;
    };
    let _alone = REPLICAS_UP.write().await;
    let database = fresh(c).await;
    let quorum = ClickHouseConfig {
        insert_quorum: Some(2),
        ..c.config(0, &database)
    };
    let batch = rows(20, &["dev_a"]);
    insert(&quorum, &batch[..10])
        .await
        .expect("both replicas up");

    c.stop_replica(1);
    let started = Instant::now();
    let refused = insert(&quorum, &batch[10..]).await;
    let mut dedup_query = batch.clone();
    let replay = sink::drop_present(&quorum.client(), &mut dedup_query).await;
    c.start_replica(1);
    match refused {
        Err(InsertError::Transient(message)) => {
            assert!(message.contains("Code: 285"), "{message}")
        }
        other => panic!("want a transient error, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once"
    );
    // The dedup query of a replay still answers from the live replica.
    assert_eq!(replay.expect("dedup with a replica down"), 10);

    // Back: the records the WAL kept go in, on both.
    let r2 = c.config(1, &database);
    eventually(&r2, "SELECT count() FROM usage_events_local", 10).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match insert(&quorum, &dedup_query).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("quorum insert after the replica came back: {e}"),
        }
    }
    for config in [&quorum, &r2] {
        eventually(config, "SELECT count() FROM usage_events_local", 20).await;
        settled(config).await;
    }
    assert_march(&r2, &batch, &["dev_a"]).await;
}
