//! TLS from the platform to the servers it uses, black-box, against real local servers with a
//! test CA (deploy/tls/test-ca.sh): PostgreSQL (`sslmode=verify-full`, plaintext refused by the
//! server), Redis (`rediss://` with a client certificate: limits, key-change notices and their
//! subscription), ClickHouse (`https://`), SMTP (STARTTLS and implicit TLS). Each client is
//! also shown to refuse a server whose certificate its CA did not sign.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::Admin;
use common::tls::Ca;
use common::*;
use serde_json::json;

/// `redis-server` with TLS only (no plaintext port), asking clients for a certificate.
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(ca: &Ca) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &ca.file("server.crt")])
            .args(["--tls-key-file", &ca.file("server.key")])
            .args(["--tls-ca-cert-file", &ca.file("ca.crt")])
            .args(["--tls-auth-clients", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server is built with TLS)");
        let redis = TlsRedis {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(ca, &["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "TLS redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` over TLS with the client certificate.
    fn cli(&self, ca: &Ca, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &ca.file("ca.crt")])
            .args([
                "--cert",
                &ca.file("client.crt"),
                "--key",
                &ca.file("client.key"),
            ])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private PostgreSQL cluster (Debian's postgresql-15) accepting TLS connections only
/// (`hostssl … trust`, `hostnossl … reject`), run as the `postgres` user when we are root.
struct TlsPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl TlsPostgres {
    fn start(ca: &Ca) -> TlsPostgres {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["server.crt", "server.key"] {
            std::fs::copy(ca.file(f), dir.path().join(f)).unwrap();
        }
        let pg = TlsPostgres {
            port: free_port(),
            dir,
        };
        if as_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(chown.success());
        }
        pg.run(&[
            "initdb",
            "-D",
            &pg.data(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        std::fs::write(
            pg.dir.path().join("data/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let d = pg.dir.path().display();
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={d} \
             -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key \
             -c fsync=off",
            pg.port
        );
        let log = format!("{d}/log");
        pg.run(&[
            "pg_ctl",
            "-D",
            &pg.data(),
            "-w",
            "-l",
            &log,
            "-o",
            &opts,
            "start",
        ]);
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, args: &[&str]) {
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c
        } else {
            Command::new(args[0])
        };
        if as_root() {
            cmd.arg(args[0]);
        }
        let out = cmd.args(&args[1..]).output().expect("PostgreSQL's tools");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL to its `postgres` database with `params`.
    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "pg_ctl"]);
            c
        } else {
            Command::new("pg_ctl")
        };
        let _ = cmd.args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

fn as_root() -> bool {
    rustix_uid() == 0
}

fn rustix_uid() -> u32 {
    // `id -u` keeps the test free of libc bindings.
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The gateway's configuration body: the mock upstream, the control plane at `database_url`
/// with `control_extra` lines, and `rest` (limits, metering).
fn gateway_body(mock: &Mock, database_url: &str, control_extra: &[&str], rest: &str) -> String {
    let mut y = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None)],
        &[],
    );
    y.push_str(&control_plane(database_url, control_extra));
    y.push_str(rest);
    y
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole control plane over TLS: the admin API and the gateway on PostgreSQL with
/// `sslmode=verify-full` (the server refuses plaintext), key-change notices published and
/// followed over `rediss://` with client certificates, shared limits in the same Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_runs_on_postgres_and_redis_over_verified_tls() {
    let ca = Ca::new();
    let pg = TlsPostgres::start(&ca);
    let redis = TlsRedis::start(&ca);
    let db_url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.file("ca.crt")
    ));
    let tls = ca.client_block("ca.crt");
    let admin = Admin::start(
        &db_url,
        &format!("redis: {{url: \"{}\", tls: {tls}}}\n", redis.url()),
    );
    let session = admin.sign_up("tls@aihub.test").await;
    let (key, key_id) = admin
        .create_key(&session, json!({"name": "tls", "rate_limit_rpm": 2}))
        .await;

    let mock = Mock::start(&[]);
    let prefix = format!("aihub-tls-{}", std::process::id());
    let gw = Gateway::start(
        &gateway_body(
            &mock,
            &db_url,
            &[
                &format!("redis_url: \"{}\"", redis.url()),
                &format!("redis_tls: {tls}"),
                "push_poll_interval: 30s",
            ],
            &format!(
                "limits:\n  redis: {{url: \"{}\", prefix: \"{prefix}\", timeout: 1s, tls: {tls}}}\n",
                redis.url()
            ),
        ),
        &[],
    );
    until("limits in Redis", Duration::from_secs(10), async || {
        gw.metric("aihub_limits_redis_up") == 1.0
    })
    .await;
    until(
        "subscribed to notices",
        Duration::from_secs(10),
        async || gw.metric("aihub_key_sync_push_connected") == 1.0,
    )
    .await;

    // The key (loaded from PostgreSQL over TLS) works and its limit is counted in Redis.
    for _ in 0..2 {
        let r = gw.chat(&key, &chat("demo")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    }
    expect_error(
        gw.chat(&key, &chat("demo")).await,
        429,
        "rate_limit_exceeded",
    )
    .await;
    let keys = redis.cli(&ca, &["--scan", "--pattern", &format!("{prefix}*")]);
    assert!(
        !keys.is_empty(),
        "no limit counters under {prefix} in Redis"
    );

    // A revocation reaches the gateway through the notice published over TLS, long before
    // the 30 s poll.
    let started = Instant::now();
    let (s, b) = admin
        .call(
            "DELETE",
            &format!("/developer/keys/{key_id}"),
            Some(&session),
            None,
        )
        .await;
    assert!(s == 200 || s == 204, "{s} {b}");
    until("revocation pushed", Duration::from_secs(5), async || {
        gw.get(&key, "/v1/models").await.status() == 401
    })
    .await;
    eprintln!("revocation reached the gateway in {:?}", started.elapsed());
}

/// Wrong or missing credentials are refused by every side: PostgreSQL's plaintext is refused
/// by the server, an unknown CA by our client; Redis without a client certificate, or signed by
/// another CA, stays down (limits fall back to local decisions, notices to polling); files that
/// do not belong together are configuration errors naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tls_settings_are_refused_not_downgraded() {
    let ca = Ca::new();
    let pg = TlsPostgres::start(&ca);
    for (params, why) in [
        ("sslmode=disable".to_owned(), "no encryption"),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                ca.file("other-ca.crt")
            ),
            "certificate verify failed",
        ),
    ] {
        let store = aihub_store::Store::connect(&aihub_store::StoreOptions::new(pg.url(&params)))
            .await
            .unwrap();
        let e = sqlx::query("SELECT 1")
            .execute(store.pool())
            .await
            .expect_err(&params)
            .to_string();
        assert!(e.contains(why), "{params}: {e}");
    }
    let good = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.file("ca.crt")
    ));
    let store = aihub_store::Store::connect(&aihub_store::StoreOptions::new(good))
        .await
        .unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(ssl);

    let redis = TlsRedis::start(&ca);
    let mock = Mock::start(&[]);
    let k = key("wrongtls", &["rate_limit_rpm: 100"]);
    let no_client_cert = format!("{{ca_file: \"{}\"}}", ca.file("ca.crt"));
    for tls in [ca.client_block("other-ca.crt"), no_client_cert] {
        let gw = Gateway::start(
            &format!(
                "{}limits:\n  redis: {{url: \"{}\", prefix: wrongtls, timeout: 200ms, tls: {tls}}}\n",
                config(
                    &[upstream("mock", &[mock.base_url()], &[])],
                    &[("demo", "mock", None)],
                    &[&k]
                ),
                redis.url()
            ),
            &[],
        );
        // Requests are served on local limits; Redis never counts as up.
        let r = gw.chat(&k.key, &chat("demo")).await;
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(gw.metric("aihub_limits_redis_up"), 0.0, "{tls}");
    }

    // Mismatched files fail the configuration check, naming the key, never echoing the URL.
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("gateway.yaml");
    write(
        &config_file,
        &format!(
            "upstreams: {{}}\nroutes: []\nkeys: []\nlimits:\n  redis:\n    url: \"rediss://:s3cret@127.0.0.1:1\"\n    \
             tls: {{client_cert_file: \"{}\", client_key_file: \"{}\"}}\n",
            ca.file("client.crt"),
            ca.file("server.key")
        ),
    );
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("limits.redis.tls.client_key_file") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// A private ClickHouse with an HTTPS port signed by the test CA.
fn clickhouse_with_https(ca: &Ca) -> (PrivateClickHouse, u16) {
    let https_port = free_port();
    let ch = PrivateClickHouse::start_with_config(&[(
        "tls.xml",
        format!(
            "<yandex>\n  <https_port>{https_port}</https_port>\n  <openSSL><server>\n    \
             <certificateFile>{}</certificateFile>\n    <privateKeyFile>{}</privateKeyFile>\n    \
             <verificationMode>none</verificationMode>\n    <loadDefaultCAFile>false</loadDefaultCAFile>\n  \
             </server></openSSL>\n</yandex>\n",
            ca.file("server.crt"),
            ca.file("server.key")
        ),
    )]);
    (ch, https_port)
}

/// Usage records reach ClickHouse over HTTPS verified against the private CA; with another CA
/// nothing is sent and the records wait in the WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_clickhouse_over_verified_https() {
    let ca = Ca::new();
    let (ch, https_port) = clickhouse_with_https(&ca);
    let mock = Mock::start(&[]);
    let k = key("chtls", &[]);
    let db = TestDb::on(&ch.url);
    let metering = |ca_file: &str, wal: &Path| {
        format!(
            "metering:\n  clickhouse: {{url: \"https://127.0.0.1:{https_port}\", database: {}, \
             tls: {{ca_file: \"{}\"}}}}\n  wal_dir: \"{}\"\n  batch_max_age: 200ms\n",
            db.name,
            ca.file(ca_file),
            wal.display()
        )
    };
    let body = |m: String| {
        format!(
            "{}{m}",
            config(
                &[upstream("mock", &[mock.base_url()], &[])],
                &[("demo", "mock", None)],
                &[&k]
            )
        )
    };
    let wal = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&body(metering("ca.crt", wal.path())), &[]);
    for _ in 0..3 {
        assert_eq!(gw.chat(&k.key, &chat("demo")).await.status(), 200);
    }
    let rows = db
        .wait_for(
            "SELECT count() FROM usage_events WHERE key_id = 'chtls'",
            3,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(rows, 3);
    drop(gw);

    let wal2 = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&body(metering("other-ca.crt", wal2.path())), &[]);
    assert_eq!(gw.chat(&k.key, &chat("demo")).await.status(), 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        db.number("SELECT count() FROM usage_events WHERE key_id = 'chtls'")
            .await,
        3,
        "a record went to a server the CA did not sign"
    );
    assert!(
        wal_bytes(wal2.path()) > 0,
        "the unsent record is kept in the WAL"
    );
    gw.wait_for_log("certificate verify failed");
}

fn wal_bytes(dir: &Path) -> u64 {
    // Segments are in the process's own folder of the WAL.
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .filter(|e| e.file_name() != "LOCK")
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// An aiosmtpd server (e2e/smtp_server.py) with the test CA's server certificate, writing what
/// it receives into `maildir`.
struct Smtp {
    child: Child,
    port: u16,
}

impl Smtp {
    fn start(ca: &Ca, mode: &str, maildir: &Path) -> Smtp {
        let port = free_port();
        let python = test_tool("AIHUB_TEST_PYTHON", "python3");
        let mut child = Command::new(python)
            .arg(repo_root().join("e2e/smtp_server.py"))
            .args(["--port", &port.to_string(), "--mode", mode])
            .args([
                "--cert",
                &ca.file("server.crt"),
                "--key",
                &ca.file("server.key"),
            ])
            .arg("--maildir")
            .arg(maildir)
            .stdout(Stdio::piped())
            // aiosmtpd prints a traceback for every refused handshake (the wrong-CA cases).
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("python: {e}; {TEST_TOOLS_HINT}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd missing? {TEST_TOOLS_HINT}");
        Smtp { child, port }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sign-up mail goes through an SMTP relay over STARTTLS and over implicit TLS, verified
/// against the private CA (the relay refuses mail before STARTTLS); with another CA nothing is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_over_starttls_and_implicit_tls() {
    let ca = Ca::new();
    for mode in ["starttls", "tls"] {
        let maildir = tempfile::tempdir().unwrap();
        let smtp = Smtp::start(&ca, mode, maildir.path());
        let db = tempfile::tempdir().unwrap();
        let db_url = format!("sqlite://{}", db.path().join("admin.db").display());
        let email = |ca_file: &str| {
            format!(
                "email:\n  transport: {{kind: smtp, host: 127.0.0.1, port: {}, security: {mode}, \
                 tls: {{ca_file: \"{}\"}}}}\n",
                smtp.port,
                ca.file(ca_file)
            )
        };
        let register = async |admin: &Admin, to: &str| {
            let (s, _) = admin
                .call(
                    "POST",
                    "/developer/register",
                    None,
                    Some(
                        json!({"email": to, "password": common::admin::PASSWORD, "full_name": "X"}),
                    ),
                )
                .await;
            assert_eq!(s, 202);
        };

        let admin = Admin::start(&db_url, &email("ca.crt"));
        let to = format!("{mode}@aihub.test");
        register(&admin, &to).await;
        let token = mail_token_in(maildir.path(), &to).await;
        let (s, b) = admin
            .call(
                "POST",
                "/developer/verify-email",
                None,
                Some(json!({"token": token})),
            )
            .await;
        assert_eq!(s, 200, "{mode}: {b}");
        drop(admin);

        let admin = Admin::start(&db_url, &email("other-ca.crt"));
        register(&admin, &format!("other-{mode}@aihub.test")).await;
        let log = until_log(&admin.log, "certificate verify failed").await;
        assert_eq!(
            std::fs::read_dir(maildir.path()).unwrap().count(),
            1,
            "{mode}: mail sent to a relay the CA did not sign; {}",
            last_lines(&log, 20)
        );
    }
}

/// The token in the mail to `to` that the relay wrote into `dir`.
async fn mail_token_in(dir: &Path, to: &str) -> String {
    for _ in 0..400 {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if text.contains(&format!("To: {to}")) {
                let mut lines = text.lines();
                while let Some(l) = lines.next() {
                    if l.contains("paste this token") {
                        return lines.next().unwrap().trim().to_owned();
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no mail to {to} in {}", dir.display());
}

/// The log once it contains `needle` (10 s at most).
async fn until_log(log: &Path, needle: &str) -> String {
    for _ in 0..200 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    panic!(
        "no `{needle}` in {}: {}",
        log.display(),
        last_lines(&text, 20)
    );
}
