//! Test harness: starts the real `aihub` binary (gateway and mock upstream) as child processes
//! on loopback, writes their configuration into a temporary directory, and stops them on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

pub mod admin;
pub mod faultproxy;
pub mod tls;

pub const BIN: &str = env!("CARGO_BIN_EXE_aihub");

/// What to run when a test tool (Chromium, Node.js with e2e/'s packages, the Python `openai`
/// SDK) is missing.
pub const TEST_TOOLS_HINT: &str = "run `source deploy/local/test-tools.sh` from the repository \
     root: it installs Chromium, Node.js with e2e/'s packages and a Python venv with the `openai` \
     SDK, and exports AIHUB_TEST_CHROMIUM / AIHUB_TEST_NODE / AIHUB_TEST_PYTHON";

/// The tool `deploy/local/test-tools.sh` exported as `var`, else `default`.
pub fn test_tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The last `n` lines of `text`, for failure messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads a raw connection until a JSON error answer ended (`}}`), the peer closed, or its read
/// timeout passed; returns what arrived.
pub fn read_error_answer(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&out).contains("}}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A port nobody listens on right now (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A running mock upstream.
pub struct Mock {
    child: Child,
    pub addr: SocketAddr,
    /// `https` when started with `--tls-cert`/`--tls-key`, else `http`.
    scheme: &'static str,
}

impl Mock {
    /// Starts `aihub mock-upstream --listen 127.0.0.1:0 <args>` (`<args>` may name their own
    /// `--listen`) and reads its scheme and address (`listening on http://…` or, with
    /// `--tls-cert`, `listening on https://…`).
    pub fn start(args: &[&str]) -> Mock {
        let threads: &[&str] = if args.contains(&"--threads") {
            &[]
        } else {
            &["--threads", "1"]
        };
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(BIN)
            .arg("mock-upstream")
            .args(listen)
            .args(threads)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mock upstream");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let rest = line.trim().strip_prefix("listening on ");
        let (scheme, addr) = rest
            .and_then(|r| {
                (r.strip_prefix("https://").map(|a| ("https", a)))
                    .or_else(|| r.strip_prefix("http://").map(|a| ("http", a)))
            })
            .unwrap_or_else(|| panic!("unexpected mock output: {line:?}"));
        let addr = addr.parse().unwrap();
        Mock {
            child,
            addr,
            scheme,
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// `<scheme>://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    /// `<scheme>://127.0.0.1:PORT` (the control endpoints live under `/__mock/`).
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// How many requests `what` (`"POST /v1/chat/completions"`) the mock received
    /// (`GET /__mock/stats`).
    pub async fn received(&self, what: &str) -> u64 {
        let v: serde_json::Value = client()
            .get(format!("{}/__mock/stats", self.origin()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["by_path"][what].as_u64().unwrap_or(0)
    }

    /// Makes every later request answer `status` (`None`: back to normal; `POST /__mock/fail`).
    pub async fn fail(&self, status: Option<u16>) {
        let r = client()
            .post(format!("{}/__mock/fail", self.origin()))
            .json(&serde_json::json!({ "status": status }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A key and its YAML entry.
pub struct TestKey {
    pub key: String,
    pub yaml: String,
}

/// Builds a key entry; `extra` is appended as YAML fields (e.g. `models: ["demo"]`).
pub fn key(id: &str, extra: &[&str]) -> TestKey {
    let key = aihub_apikey::generate();
    let mut yaml = format!(
        "  - id: {id}\n    hash: sha256:{}\n    developer_id: dev_{id}\n",
        aihub_apikey::KeyHash::of(&key).to_hex()
    );
    for e in extra {
        yaml.push_str(&format!("    {e}\n"));
    }
    TestKey { key, yaml }
}

/// RFC 3339 for `now + d`.
pub fn rfc3339_in(d: Duration) -> String {
    humantime_rfc3339(SystemTime::now() + d)
}

fn humantime_rfc3339(t: SystemTime) -> String {
    // Seconds precision, UTC, "Z": what the config accepts.
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Howard Hinnant's days → civil date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A running gateway with its configuration file and log.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub log: PathBuf,
}

impl Gateway {
    /// Writes `body` (YAML without the `server:` section) after a generated `server:` section
    /// with free ports and `server_extra` lines, starts the gateway and waits until it is ready.
    pub fn start(body: &str, server_extra: &[&str]) -> Gateway {
        Self::start_with_env(body, server_extra, &[])
    }

    pub fn start_with_env(body: &str, server_extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::launch(body, server_extra, env, "/readyz")
    }

    /// Like [`Gateway::start`], but waits only for `/healthz` (the process serves), not for
    /// readiness: for gateways that cannot load their keys yet.
    pub fn start_live(body: &str, server_extra: &[&str]) -> Gateway {
        Self::launch(body, server_extra, &[], "/healthz")
    }

    fn launch(body: &str, server_extra: &[&str], env: &[(&str, &str)], probe: &str) -> Gateway {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (port, ops_port) = (free_port(), free_port());
            // `+listen: ITEM` lines add listeners after the plain one the harness probes.
            let mut listen = vec![format!("\"127.0.0.1:{port}\"")];
            listen.extend(
                server_extra
                    .iter()
                    .filter_map(|l| l.strip_prefix("+listen: ").map(str::to_owned)),
            );
            let mut yaml = format!(
                "server:\n  listen: [{}]\n  ops_listen: 127.0.0.1:{ops_port}\n",
                listen.join(", ")
            );
            let has_threads = server_extra.iter().any(|l| l.starts_with("threads"));
            if !has_threads {
                yaml.push_str("  threads: 1\n");
            }
            for line in server_extra.iter().filter(|l| !l.starts_with("+listen: ")) {
                yaml.push_str(&format!("  {line}\n"));
            }
            yaml.push_str(body);
            let config = dir.path().join("gateway.yaml");
            std::fs::write(&config, yaml).unwrap();
            let log = dir.path().join("gateway.log");
            let mut cmd = Command::new(BIN);
            cmd.args(["gateway", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().expect("spawn gateway");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let ops: SocketAddr = format!("127.0.0.1:{ops_port}").parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: most likely a port collision; try again
                }
                // Ready means: the ops port answers, the proxy port answers like a gateway (an
                // unauthenticated `/v1/models` is a 401; a mock or another process that took
                // the port between `free_port` and the bind would not say that), and our
                // process is still alive.
                if answers(ops, probe)
                    && http_get(addr, "/v1/models").0 == 401
                    && matches!(child.try_wait(), Ok(None))
                {
                    return Gateway {
                        child,
                        dir,
                        addr,
                        ops,
                        log,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("gateway did not become ready:\n{last_log}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGHUP (configuration reload).
    pub fn reload(&self) {
        signal(self.pid(), "HUP");
    }

    pub fn metrics(&self) -> String {
        http_get(self.ops, "/metrics").1
    }

    /// The value of one metric line (`name{labels}`), or 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Polls `metric(series)` until it equals `expected` (metrics of a request are recorded
    /// after its response ends) or 5 s pass; returns the last value.
    pub fn metric_eventually(&self, series: &str, expected: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(series);
            if v == expected || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it contains `needle` (the access line is written after the response ends).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log_text();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A POST to `path` with `key` as bearer token, on a shared client.
    pub fn post(&self, key: &str, path: &str) -> reqwest::RequestBuilder {
        shared_client().post(self.url(path)).bearer_auth(key)
    }

    /// A GET of `path` with `key` as bearer token.
    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        shared_client()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/chat/completions` with `body`; panics on transport errors.
    pub async fn chat(&self, key: &str, body: &serde_json::Value) -> reqwest::Response {
        self.post(key, "/v1/chat/completions")
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        signal(self.child.id(), "INT");
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

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn answers(ops: SocketAddr, path: &str) -> bool {
    std::net::TcpStream::connect_timeout(&ops, Duration::from_millis(200)).is_ok()
        && http_get(ops, path).0 == 200
}

/// A `control_plane:` section reading keys from `database_url`, with extra lines
/// (`redis_url: …`, `poll_interval: …`).
pub fn control_plane(database_url: &str, extra: &[&str]) -> String {
    let mut y = format!("control_plane:\n  database_url: \"{database_url}\"\n");
    for e in extra {
        y.push_str(&format!("  {e}\n"));
    }
    y
}

/// A minimal blocking GET (for the ops listener), returning status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// YAML for one upstream named `name` with `endpoints`, plus extra lines.
pub fn upstream(name: &str, endpoints: &[String], extra: &[&str]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut y = format!("  {name}:\n    endpoints: [{}]\n", list.join(", "));
    for e in extra {
        y.push_str(&format!("    {e}\n"));
    }
    y
}

/// A whole config body: upstreams, routes `(model, upstream, upstream_model)`, keys.
pub fn config(
    upstreams: &[String],
    routes: &[(&str, &str, Option<&str>)],
    keys: &[&TestKey],
) -> String {
    let mut y = String::from("upstreams:\n");
    for u in upstreams {
        y.push_str(u);
    }
    y.push_str("routes:\n");
    for (model, up, alias) in routes {
        y.push_str(&format!("  - model: {model}\n    upstream: {up}\n"));
        if let Some(a) = alias {
            y.push_str(&format!("    upstream_model: {a}\n"));
        }
    }
    y.push_str("keys:\n");
    for k in keys {
        y.push_str(&k.yaml);
    }
    if keys.is_empty() {
        y.push_str("  []\n");
    }
    y
}

fn shared_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(client)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        // Under ClickHouse's 3 s keep-alive: a connection it closed is never reused (a reply cut
        // short, `IncompleteMessage`, failed a loaded CI run).
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Asserts an OpenAI-shaped error with `status` and `code`; returns the error object.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert!(resp.headers().contains_key("x-request-id"));
    let v: serde_json::Value = resp.json().await.expect("JSON error body");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].as_str().is_some(), "{v}");
    e.clone()
}

pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// ClickHouse for tests: `AIHUB_TEST_CLICKHOUSE_URL` (default `http://127.0.0.1:8123`), started
/// by `deploy/local/test.sh`.
pub fn clickhouse_url() -> String {
    std::env::var("AIHUB_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A fresh database per test, dropped afterwards.
pub struct TestDb {
    pub url: String,
    pub name: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        Self::on(&clickhouse_url())
    }

    pub fn on(url: &str) -> TestDb {
        let random = &aihub_apikey::generate()[aihub_apikey::PREFIX.len()..][..12];
        TestDb {
            url: url.to_owned(),
            name: format!("aihub_test_{}", random.to_ascii_lowercase()),
        }
    }

    /// Runs `sql` and returns the response body (TSV); panics on HTTP errors.
    pub async fn query(&self, sql: &str) -> String {
        let resp = shared_client()
            .post(format!("{}/?database={}", self.url, self.name))
            .body(sql.to_owned())
            .send()
            .await
            .expect("ClickHouse reachable");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{sql}: {text}");
        text
    }

    /// A single number from `sql`.
    pub async fn number(&self, sql: &str) -> i128 {
        self.query(sql).await.trim().parse().unwrap_or(0)
    }

    /// Polls `sql` until it returns `expected` (rows arrive in batches) or `timeout` passes.
    pub async fn wait_for(&self, sql: &str, expected: i128, timeout: Duration) -> i128 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = match shared_client()
                .post(format!("{}/?database={}", self.url, self.name))
                .body(sql.to_owned())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .trim()
                    .parse()
                    .unwrap_or(-1),
                _ => -1,
            };
            if got == expected || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The `metering:` section pointing at this database, with the WAL in `wal_dir`.
    pub fn metering_yaml(&self, wal_dir: &Path, extra: &[&str]) -> String {
        let mut y = format!(
            "metering:\n  clickhouse: {{url: \"{}\", database: {}}}\n  wal_dir: \"{}\"\n",
            self.url,
            self.name,
            wal_dir.display()
        );
        if !extra.iter().any(|e| e.starts_with("batch_max_age")) {
            y.push_str("  batch_max_age: 200ms\n");
        }
        for e in extra {
            y.push_str(&format!("  {e}\n"));
        }
        y
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        use std::io::Write;
        let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        let Some(addr) = self.url.strip_prefix("http://") else {
            return;
        };
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = write!(
                s,
                "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
                sql.len()
            );
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = std::io::Read::read(&mut s, &mut [0u8; 256]);
        }
    }
}

/// A private ClickHouse server (for tests that stop and start it), via deploy/clickhouse.
pub struct PrivateClickHouse {
    pub dir: tempfile::TempDir,
    pub url: String,
    ports: [u16; 3],
}

impl PrivateClickHouse {
    pub fn start() -> PrivateClickHouse {
        Self::start_with_config(&[])
    }

    /// Starts it with extra server settings: `(file name, XML)` written into its `config.d/`
    /// (merged into the generated config.xml).
    pub fn start_with_config(files: &[(&str, String)]) -> PrivateClickHouse {
        let ports = [free_port(), free_port(), free_port()];
        let ch = PrivateClickHouse {
            url: format!("http://127.0.0.1:{}", ports[0]),
            dir: tempfile::tempdir().unwrap(),
            ports,
        };
        if !files.is_empty() {
            let d = ch.dir.path().join("config.d");
            std::fs::create_dir_all(&d).unwrap();
            for (name, xml) in files {
                std::fs::write(d.join(name), xml).unwrap();
            }
        }
        ch.restart();
        ch
    }

    fn run(&self, script: &str, ports: bool) {
        let mut cmd = Command::new(repo_root().join("deploy/clickhouse").join(script));
        cmd.arg(self.dir.path()).stdout(Stdio::null());
        if ports {
            cmd.args([self.ports[0].to_string(), self.ports[1].to_string()])
                .env("CLICKHOUSE_INTERSERVER_PORT", self.ports[2].to_string());
        }
        assert!(cmd.status().unwrap().success(), "{script} failed");
    }

    pub fn stop(&self) {
        self.run("stop.sh", false);
    }

    pub fn restart(&self) {
        self.run("start.sh", true);
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Closed-loop chat load from `workers` clients (alternating JSON and SSE) until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(gw: &Gateway, key: &str, model: &str, workers: u64, pause: Duration) -> Load {
        use std::sync::atomic::Ordering;
        let load = Load {
            stop: Default::default(),
            ok: Default::default(),
            failed: Default::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (ok, failed, stop) = (load.ok.clone(), load.failed.clone(), load.stop.clone());
            let (url, key, model) = (
                gw.url("/v1/chat/completions"),
                key.to_owned(),
                model.to_owned(),
            );
            tasks.push(tokio::spawn(async move {
                let c = client();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut body = chat(&model);
                    body["stream"] = (i + w).is_multiple_of(2).into();
                    i += 1;
                    let okay = match c.post(&url).bearer_auth(&key).json(&body).send().await {
                        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if okay { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }));
        }
        Load { tasks, ..load }
    }

    /// Stops the clients; returns (successful, failed) request counts.
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Stores a new key for `dev` as the admin API does; returns the key and its id.
pub async fn create_key(
    store: &aihub_store::Store,
    dev: &str,
    ip_allowlist: &[&str],
) -> (String, String) {
    let key = aihub_apikey::generate();
    let mut tx = store.begin_write().await.unwrap();
    let stored = aihub_store::keys::insert(
        &mut tx,
        &aihub_store::keys::NewKey {
            id: aihub_store::new_id("key_"),
            developer_id: dev.into(),
            name: "test".into(),
            key_hash: aihub_apikey::KeyHash::of(&key).to_hex(),
            key_prefix: aihub_apikey::display_prefix(&key),
            models: vec!["*".into()],
            endpoints: vec!["*".into()],
            ip_allowlist: ip_allowlist.iter().map(|s| s.to_string()).collect(),
            rate_limit_rpm: None,
            rate_limit_tpm: None,
            expires_at: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    (key, stored.id)
}
