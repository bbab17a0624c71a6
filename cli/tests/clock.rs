//! Black-box tests of the system clock stepping backwards and forwards under a running `aihub`
//! (issue 21, item 4): libfaketime (`LD_PRELOAD`, `FAKETIME_TIMESTAMP_FILE`, re-read on every
//! call) shifts the wall clock of one process while its monotonic clock stays real.
//!
//! The rule the product follows: durations (rate-limit buckets, token lifetimes) are measured on
//! the monotonic clock or bounded against steps; the wall clock only answers calendar facts (the
//! quota's month, a key's `expires_at`, the invoice period). So a step back refills no bucket
//! and reopens no spent quota, a step forward across a month's end starts the new period, a key
//! is expired exactly while the wall clock is past `expires_at`, an admin token is never
//! accepted beyond its real lifetime, and each closed month is invoiced once.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::admin::Admin;
use common::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The wall clock of the processes started with [`FakeClock::env`]: an offset from the real
/// time, changed at once for every running process.
struct FakeClock {
    dir: tempfile::TempDir,
}

impl FakeClock {
    fn new() -> FakeClock {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} missing: install the Debian package `faketime`"
        );
        let c = FakeClock {
            dir: tempfile::tempdir().unwrap(),
        };
        c.set(0);
        c
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("faketime")
    }

    /// The environment that puts a process on this clock (monotonic time stays real; file
    /// times are not faked).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.into()),
            ("FAKETIME_TIMESTAMP_FILE", self.file().display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("DONT_FAKE_MONOTONIC", "1".into()),
            ("NO_FAKE_STAT", "1".into()),
        ]
    }

    /// Steps the clock to real time + `secs` (negative: back).
    fn set(&self, secs: i64) {
        let tmp = self.dir.path().join("faketime.tmp");
        std::fs::write(&tmp, format!("{secs:+}s\n")).unwrap();
        std::fs::rename(&tmp, self.file()).unwrap();
    }
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Seconds from now to `secs_after` past the start of the next month (UTC).
fn to_next_month(secs_after: i64) -> i64 {
    let now_ms = now_s() * 1000;
    let next = aihub_plans::Period::of_unix_ms(now_ms).next();
    (next.start_ms() - now_ms) / 1000 + secs_after
}

const BODY: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"Say hello"}],"max_tokens":10}"#;

async fn send(gw: &Gateway, key: &str) -> u16 {
    let r = gw
        .post(key, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

/// The status and error code of one request.
async fn code(gw: &Gateway, key: &str) -> (u16, String) {
    let r = gw
        .post(key, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_quotas_and_key_expiry_under_clock_steps() {
    let clock = FakeClock::new();
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans.yaml");
    write(
        &plans,
        "default_plan: test\nplans:\n  test:\n    included_tokens: 100\n    overage: false\n    \
         requests_per_minute: 1000\n",
    );
    let rl = key("rl", &["rate_limit_rpm: 3"]);
    let exp = key(
        "exp",
        &[format!("expires_at: \"{}\"", rfc3339_in(Duration::from_secs(3600))).as_str()],
    );
    let q = key("q", &["plan: test"]);
    let body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        &[&rl, &exp, &q],
    ) + &format!(
        "limits:\n  default_max_tokens: 1024\n  plans_file: \"{}\"\n",
        plans.display()
    );
    let env = clock.env();
    let gw = Gateway::start_with_env(&body, &["threads: 2"], &env_refs(&env));

    // Real time: the burst of 3 passes, the 4th is refused (one regenerates every 20 s).
    for _ in 0..3 {
        assert_eq!(send(&gw, &rl.key).await, 200);
    }
    assert_eq!(
        code(&gw, &rl.key).await,
        (429, "rate_limit_exceeded".into())
    );
    assert_eq!(send(&gw, &exp.key).await, 200);
    // The quota: 14 tokens a request, 100 included; refused once spent.
    let mut spent = 0;
    while code(&gw, &q.key).await.0 == 200 {
        spent += 1;
        assert!(spent < 20, "the quota never refused");
    }
    assert_eq!(code(&gw, &q.key).await, (429, "insufficient_quota".into()));

    // Back an hour: no bucket refills, the spent quota stays spent, the key still valid.
    clock.set(-3600);
    assert_eq!(
        code(&gw, &rl.key).await.0,
        429,
        "a step back refilled the bucket"
    );
    assert_eq!(
        code(&gw, &q.key).await.0,
        429,
        "a step back reopened the quota"
    );
    assert_eq!(send(&gw, &exp.key).await, 200);

    // Forward two hours (same month unless the test runs in a month's last two hours): the
    // bucket is not refilled either; the key is past `expires_at`.
    clock.set(7200);
    assert_eq!(
        code(&gw, &rl.key).await.0,
        429,
        "a step forward refilled the bucket"
    );
    assert_eq!(code(&gw, &exp.key).await, (401, "api_key_expired".into()));

    // Forward across the month's end: the new period's quota is open.
    clock.set(to_next_month(60));
    assert_eq!(send(&gw, &q.key).await, 200, "the new month's quota");
    assert_eq!(code(&gw, &rl.key).await.0, 429);
    assert_eq!(code(&gw, &exp.key).await.0, 401);

    // Back to the real time, in the spent month again: still spent (the old month's usage
    // came back with it); the key valid again (its `expires_at` is an hour away).
    clock.set(0);
    assert_eq!(
        code(&gw, &q.key).await,
        (429, "insufficient_quota".into()),
        "a step back into the spent month reopened its quota"
    );
    assert_eq!(send(&gw, &exp.key).await, 200);
    // And forward again: the new month's usage (one request) is still counted there.
    clock.set(to_next_month(120));
    assert_eq!(send(&gw, &q.key).await, 200);
    println!(
        "clock steps: the quota refused after {spent} requests; refused at -1 h, +2 h and \
         back in its month; open in the next month; the rate-limit bucket refused at -1 h, +2 h \
         and next month; the key expired only while the clock was past expires_at"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_live_no_longer_than_their_real_lifetime() {
    let clock = FakeClock::new();
    let db = tempfile::tempdir().unwrap();
    let env = clock.env();
    let admin = Admin::start_with_env(
        "127.0.0.1:0",
        &format!("sqlite://{}", db.path().join("admin.db").display()),
        "auth: {argon2_memory_kib: 8192, argon2_iterations: 1, access_token_ttl: 10m}\n",
        &env_refs(&env),
    );
    let me = |token: String| {
        let admin = &admin;
        async move {
            let (s, b) = admin.call("GET", "/developer/me", Some(&token), None).await;
            if s != 200 {
                assert!(b["error"]["message"].is_string(), "error shape: {b}");
            }
            s
        }
    };
    let token = admin.login("ops@aihub.test").await;
    assert_eq!(me(token.clone()).await, 200);
    // Past its lifetime: refused.
    clock.set(11 * 60);
    assert_eq!(me(token.clone()).await, 401, "a token past exp");
    // Back to the real time: seconds of its 10 minutes went by, so it is valid.
    clock.set(0);
    assert_eq!(me(token.clone()).await, 200);
    // The clock steps back an hour: `exp` alone would keep the token for 1 h 10 min of real
    // time. Issued "in the future", it is refused (its holder signs in again).
    clock.set(-3600);
    assert_eq!(
        me(token.clone()).await,
        401,
        "a token issued before a step back"
    );
    // A token issued on the stepped-back clock lives its 10 minutes of that clock: once the
    // clock is corrected it is expired, never longer than its lifetime.
    let early = admin.login("ops@aihub.test").await;
    assert_eq!(me(early.clone()).await, 200);
    clock.set(0);
    assert_eq!(me(early).await, 401);
    assert_eq!(me(token).await, 200);
}

const PLANS: &str = "default_plan: tiny
plans:
  tiny:
    display_name: Tiny
    monthly_price_usd: 1
    included_tokens: 100
    overage: true
";

/// `(period, status, requests)` of the developer's invoices.
async fn invoices_of(store: &aihub_store::Store, dev: &str) -> Vec<(String, String, i64)> {
    use sqlx::Row;
    sqlx::query(
        "SELECT period, status, requests FROM invoices WHERE developer_id = $1 \
         ORDER BY period, created_at",
    )
    .bind(dev)
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get::<String, _>(0),
            r.get::<String, _>(1),
            r.get::<i64, _>(2),
        )
    })
    .collect()
}

/// Polls until the developer's invoices equal `want` (the job runs every second) or 15 s pass.
async fn invoices_become(
    store: &aihub_store::Store,
    dev: &str,
    want: &[(String, String, i64)],
) -> Vec<(String, String, i64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = invoices_of(store, dev).await;
        if got == want || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoice_job_closes_each_month_once_under_clock_steps() {
    use aihub_store::testing::{Backend, TestDatabase};
    let clock = FakeClock::new();
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mock = Mock::start(&[]);
    let k = key("bill", &[]);
    let gw = Gateway::start(
        &format!(
            "{}{}",
            config(
                &[upstream("m", &[mock.base_url()], &[])],
                &[("gpt-4o", "m", None)],
                &[&k]
            ),
            db.metering_yaml(wal.path(), &[])
        ),
        &[],
    );
    let store_db = TestDatabase::new(Backend::Sqlite).await;
    let store = store_db.store().await;
    let now = aihub_store::now_ms();
    let month = aihub_plans::Period::of_unix_ms(now);
    let (last, this) = (month.prev(), month.to_string());
    // On the plan since before last month: last month is invoiced (its base fee) at start.
    aihub_store::testing::imported(&store, "dev_bill", "tiny", last.start_ms() - 86_400_000).await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&k.key, &chat("gpt-4o")).await.status(), 200);
    }
    assert_eq!(
        db.wait_for(
            "SELECT count() FROM usage_events",
            3,
            Duration::from_secs(20)
        )
        .await,
        3
    );
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("plans.yaml"), PLANS);
    let env = clock.env();
    let _admin = Admin::start_with_env(
        "127.0.0.1:0",
        &store_db.url,
        &format!(
            "clickhouse: {{url: \"{}\", database: {}}}\nplans_file: \"{}\"\n\
             billing: {{run_every: 1s, grace_period: 1h}}\n",
            db.url,
            db.name,
            dir.path().join("plans.yaml").display()
        ),
        &env_refs(&env),
    );
    let row = |p: &str, s: &str, n: i64| (p.to_owned(), s.to_owned(), n);
    let last_month = row(&last.to_string(), "open", 0);
    let got = invoices_become(&store, "dev_bill", std::slice::from_ref(&last_month)).await;
    assert_eq!(
        got,
        std::slice::from_ref(&last_month),
        "last month, at start"
    );

    // Ten minutes into next month (inside the 1 h grace window): this month's draft.
    clock.set(to_next_month(600));
    let draft = row(&this, "draft", 3);
    let got = invoices_become(&store, "dev_bill", &[last_month.clone(), draft.clone()]).await;
    assert_eq!(got, [last_month.clone(), draft.clone()], "the draft");
    // Back to the real time: the month is open again; nothing is generated or finalized.
    clock.set(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        invoices_of(&store, "dev_bill").await,
        [last_month.clone(), draft]
    );
    // Past the grace window: finalized, once.
    clock.set(to_next_month(2 * 3600));
    let fin = row(&this, "open", 3);
    let got = invoices_become(&store, "dev_bill", &[last_month.clone(), fin.clone()]).await;
    assert_eq!(got, [last_month.clone(), fin.clone()], "finalized");
    // Back, and forward again: no second invoice.
    clock.set(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    clock.set(to_next_month(3 * 3600));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = invoices_of(&store, "dev_bill").await;
    let this_month = got.iter().filter(|i| i.0 == this).count();
    assert_eq!(this_month, 1, "{got:?}");
    assert!(got.contains(&fin), "{got:?}");
    println!("invoices after the steps: {got:?}");
}
