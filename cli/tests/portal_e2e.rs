//! The developer portal end to end in a real browser, black-box: a real `aihub admin` (the
//! portal, SQLite control plane, file mail transport), a real `aihub gateway` following its
//! keys and metering into a fresh ClickHouse database, the mock upstream — and headless
//! Chromium driven by `e2e/portal.spec.mjs` (Node, playwright-core).
//!
//! The script covers sign-up through the forms (verification mail, confirm, login), creating
//! a key (shown once, copied through the clipboard, never in the list's HTML), a chat
//! completion with it, its request/tokens/cost on the dashboard and the usage page, revocation
//! seen by the gateway, the CSRF refusals, the language switch, phone-width layout (full-page
//! screenshots, no horizontal overflow) and no console errors or CSP violations on any page.
//!
//! Needs Chromium, Node.js and `e2e/node_modules`: `source deploy/local/test-tools.sh` installs
//! them and exports `AIHUB_TEST_CHROMIUM` and `AIHUB_TEST_NODE` (defaults: `/usr/bin/chromium`,
//! `node` on `PATH`). Screenshots are kept in `<target>/tmp/portal-e2e/`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aihub_store::testing::{Backend, TestDatabase};
use common::admin::Admin;
use common::{
    config, control_plane, last_lines, repo_root, test_tool, upstream, Gateway, Mock, TestDb,
    TEST_TOOLS_HINT,
};

/// The whole browser run's limit (it takes well under a minute).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// Prices high enough that one small request shows a non-zero cost (the portal shows four
/// decimals below $1).
const PRICING: &str =
    "pricing:\n  default: {per_1k: 0.001}\n  models:\n    gpt-4o-mini: {per_1k: 0.01}\n";

/// Node.js and Chromium, or a panic saying how to install them.
fn tools(e2e: &Path) -> (String, String) {
    let node = test_tool("AIHUB_TEST_NODE", "node");
    let chromium = test_tool("AIHUB_TEST_CHROMIUM", "/usr/bin/chromium");
    let node_ok = Command::new(&node)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(node_ok, "Node.js ({node}) not found: {TEST_TOOLS_HINT}");
    assert!(
        Path::new(&chromium).is_file(),
        "Chromium ({chromium}) not found: {TEST_TOOLS_HINT}"
    );
    assert!(
        e2e.join("node_modules/playwright-core/package.json")
            .is_file(),
        "e2e/node_modules/playwright-core is missing: {TEST_TOOLS_HINT}"
    );
    (node, chromium)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_in_headless_chromium() {
    let e2e = repo_root().join("e2e");
    let (node, chromium) = tools(&e2e);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("portal-e2e");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    // The control plane's schema first (the admin API owns it; the gateway only reads it),
    // then the gateway, then the admin, which names the gateway's URL on its pages.
    let cp = TestDatabase::new(Backend::Sqlite).await;
    cp.store().await.close().await;
    let usage = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mock = Mock::start(&[]);
    // The Tasks step's model: answers after 3 s, so its task is seen running, then done.
    let slow = Mock::start(&["--latency", "3s"]);
    let body = config(
        &[
            upstream("mock", &[mock.base_url()], &[]),
            upstream("slow", &[slow.base_url()], &[]),
        ],
        &[("gpt-4o-mini", "mock", None), ("slow-model", "slow", None)],
        &[],
    ) + PRICING
        + &control_plane(&cp.url, &["poll_interval: 100ms"])
        + &usage.metering_yaml(wal.path(), &[]);
    let gw = Gateway::start(&body, &[]);
    let gateway_url = gw.url("/v1");
    let task_files = tempfile::tempdir().unwrap();
    let admin = Admin::start(
        &cp.url,
        &format!(
            "clickhouse: {{url: \"{}\", database: {}}}\n\
             portal: {{secure_cookie: false, gateway_url: \"{gateway_url}\", example_model: gpt-4o-mini}}\n\
             webhooks: {{allow_http: true, allow_networks: [\"127.0.0.0/8\"], poll_interval: 50ms}}\n\
             tasks: {{gateway_url: \"{}\", files_dir: \"{}\", poll_interval: 50ms}}\n",
            usage.url,
            usage.name,
            gw.url("").trim_end_matches('/'),
            task_files.path().display()
        ),
    );

    let (out_path, err_path) = (shots.join("stdout.log"), shots.join("stderr.log"));
    let started = Instant::now();
    let mut child = Command::new(&node)
        .arg("portal.spec.mjs")
        .current_dir(&e2e)
        .env("PORTAL_URL", &admin.base)
        .env("GATEWAY_URL", &gateway_url)
        .env("MAIL_DIR", admin.mail.path())
        .env("CHROMIUM", &chromium)
        .env("SLOW_MODEL", "slow-model")
        .env("SCREENSHOT_DIR", &shots)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {node}: {e}: {TEST_TOOLS_HINT}"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if status.is_some_and(|s| s.success()) {
        eprintln!(
            "{stdout}browser run took {took:.1?}; screenshots in {}",
            shots.display()
        );
        return;
    }
    panic!(
        "e2e/portal.spec.mjs {} after {took:.1?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\
         --- admin log (tail)\n{}\n--- gateway log (tail)\n{}\n--- screenshots in {}",
        match status {
            Some(s) => format!("failed ({s})"),
            None => format!("timed out ({SCRIPT_TIMEOUT:?})"),
        },
        last_lines(&std::fs::read_to_string(&admin.log).unwrap_or_default(), 40),
        last_lines(&gw.log_text(), 40),
        shots.display()
    );
}
